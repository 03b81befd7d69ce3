"""KServe v1 / TensorFlow Serving REST ``predict`` requests.

Wire format (``POST /v1/models/{m}[/versions/{v}]:predict``), one of::

    {"instances": [[1.0, 2.0], [3.0, 4.0]]}                 row form: one instance per row
    {"instances": [{"a": 1.0, "b": [1, 2]}, {...}]}        row form, named fields (same keys in every row)
    {"inputs": [[1.0, 2.0], [3.0, 4.0]]}                    columnar form, one tensor (first dim = batch)
    {"inputs": {"a": [1.0, 3.0], "b": [[1, 2], [3, 4]]}}    columnar form, named tensors (same batch)

plus an optional ``"signature_name"`` string. An instance may be a number (a batch of scalars gives
one feature per row), a nested numeric list, or an object of named numbers/numeric lists; named
fields are concatenated per row in the order of the first instance (columnar: the object's order).
TF's ``{"b64": ...}`` binary strings are not numeric and are refused. Any other top-level key is
refused so that the guard never scores something other than what the server reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from guard_agent.protocols._base import (
    ParsedRequest,
    ParseLimits,
    ProtocolError,
    build_request,
    numeric_array,
)
from guard_agent.protocols._json import loads_object, require_json

__all__ = ["columnar_parts", "instance_parts", "parse_v1"]

_V1_KEYS = frozenset({"instances", "inputs", "signature_name"})

Parts = tuple[list[np.ndarray], tuple[str, ...]]


def _check_rows(n: int, limits: ParseLimits) -> None:
    if n == 0:
        raise ProtocolError("empty batch")
    if n > limits.max_rows:
        raise ProtocolError(f"too many rows: {n} > {limits.max_rows}")


def instance_parts(instances: Any, limits: ParseLimits, where: str = "instances") -> Parts:
    """Row form: a list of instances (numbers, numeric lists, or objects of named fields)."""
    if type(instances) is not list:
        raise ProtocolError(f"{where} must be a list")
    _check_rows(len(instances), limits)
    if type(instances[0]) is not dict:
        arr = numeric_array(instances, where=where)
        return [arr], ()
    if any(type(inst) is not dict for inst in instances):
        raise ProtocolError(f"{where}: objects mixed with other values")
    keys = tuple(instances[0])
    if not keys:
        raise ProtocolError(f"{where}[0] has no fields")
    key_set = set(keys)
    if any(inst.keys() != key_set for inst in instances):
        raise ProtocolError(f"{where}: instances have different fields")
    parts = []
    for j, key in enumerate(keys):
        column = [inst[key] for inst in instances]
        parts.append(numeric_array(column, where=f"{where}: field #{j}"))
    return parts, keys


def columnar_parts(inputs: Any, limits: ParseLimits, where: str = "inputs") -> Parts:
    """Columnar form: one tensor, or an object of named tensors whose first dimension is the batch."""
    if type(inputs) is list:
        arr = numeric_array(inputs, where=where)
        _check_rows(arr.shape[0], limits)
        return [arr], ()
    if type(inputs) is not dict:
        raise ProtocolError(f"{where} must be a list or an object of named tensors")
    if not inputs:
        raise ProtocolError(f"{where} has no tensors")
    parts = []
    for j, value in enumerate(inputs.values()):
        arr = numeric_array(value, where=f"{where}: tensor #{j}")
        if arr.ndim == 0:
            raise ProtocolError(f"{where}: tensor #{j} has no batch dimension")
        _check_rows(arr.shape[0], limits)
        parts.append(arr)
    return parts, tuple(inputs)


def parse_v1(body: bytes, *, content_type: str | None, limits: ParseLimits) -> ParsedRequest:
    """Parse a KServe v1 / TF Serving predict request into features."""
    require_json(content_type)
    doc = loads_object(body, limits.max_depth)
    extra = doc.keys() - _V1_KEYS
    if extra:
        raise ProtocolError("unknown top-level field: expected instances or inputs (and signature_name)")
    if "signature_name" in doc and type(doc["signature_name"]) is not str:
        raise ProtocolError("signature_name must be a string")
    if ("instances" in doc) == ("inputs" in doc):
        raise ProtocolError("expected exactly one of instances or inputs")
    if "instances" in doc:
        parts, names = instance_parts(doc["instances"], limits)
    else:
        parts, names = columnar_parts(doc["inputs"], limits)
    return build_request(parts, protocol="v1", row_shape=None, names=names, outputs=(), limits=limits)
