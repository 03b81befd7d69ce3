"""Open Inference Protocol (KServe v2, MLServer, Triton) inference requests.

Wire format (``POST /v2/models/{m}[/versions/{v}]/infer``)::

    {
      "id": "optional string",
      "parameters": {...},
      "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6], "parameters": {...}}
      ],
      "outputs": [{"name": "predict_proba", "parameters": {...}}]
    }

``data`` is flat or nested, row-major, with exactly ``prod(shape)`` elements; ``shape[0]`` is the batch.
Several inputs are concatenated per row (each input flattened per row; same batch size required).
Datatypes: BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64. BYTES inputs raise ``TextInput`` and are
parsed as text by ``protocols.text``; anything else is refused: the guard cannot score it.

Binary tensor extension (Triton): the ``Inference-Header-Content-Length: N`` header says the first N
bytes are the JSON header; each input with ``parameters.binary_data_size`` then takes that many raw
little-endian bytes, in input order, from the rest of the body, which must be consumed exactly.
Requests for *binary outputs* (``outputs[].parameters.binary_data`` or
``parameters.binary_data_output``) and for Triton's classification extension
(``outputs[].parameters.classification``, answered as strings) are refused: the guard must be able to
read and harden the answer.

Stricter than the spec on purpose: unknown fields at the top level or in an input, duplicate input
names, and integer datatypes carrying non-integer or out-of-range values are refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from guard_agent.protocols._base import (
    Kind,
    ParsedRequest,
    ParseLimits,
    ProtocolError,
    TextInput,
    build_request,
    numeric_array,
)
from guard_agent.protocols._json import loads_object, media_type, require_json

__all__ = ["DATATYPES", "parse_v2"]

# datatype -> (JSON scalar kind, little-endian numpy dtype, min, max)
DATATYPES: dict[str, tuple[Kind, str, float, float]] = {
    "BOOL": ("bool", "|b1", 0, 1),
    "INT8": ("int", "<i1", -(2**7), 2**7 - 1),
    "INT16": ("int", "<i2", -(2**15), 2**15 - 1),
    "INT32": ("int", "<i4", -(2**31), 2**31 - 1),
    "INT64": ("int", "<i8", -(2**63), 2**63 - 1),
    "UINT8": ("int", "<u1", 0, 2**8 - 1),
    "UINT16": ("int", "<u2", 0, 2**16 - 1),
    "UINT32": ("int", "<u4", 0, 2**32 - 1),
    "UINT64": ("int", "<u8", 0, 2**64 - 1),
    "FP16": ("float", "<f2", -math.inf, math.inf),
    "FP32": ("float", "<f4", -math.inf, math.inf),
    "FP64": ("float", "<f8", -math.inf, math.inf),
}
_TOP_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})
_MAX_DIMS = 32
_INTS = frozenset({int})


def _object(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise ProtocolError(f"{where} must be an object")
    return value


def _unknown_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    if not allowed.issuperset(obj):
        raise ProtocolError(f"{where}: unknown field (allowed: {', '.join(sorted(allowed))})")


def _shape(value: Any, where: str, limits: ParseLimits) -> tuple[int, ...]:
    if type(value) is not list or not value:
        raise ProtocolError(f"{where}.shape must be a non-empty list of integers (the first is the batch)")
    if len(value) > _MAX_DIMS:
        raise ProtocolError(f"{where}.shape has more than {_MAX_DIMS} dimensions")
    if not _INTS.issuperset(map(type, value)) or min(value) < 0:  # type checks in C: no bools, floats or nulls
        raise ProtocolError(f"{where}.shape must hold non-negative integers")
    if value[0] > limits.max_rows:
        raise ProtocolError(f"too many rows: {value[0]} > {limits.max_rows}")
    # Bound every dimension, zero-sized ones included: numpy refuses shapes whose extent overflows.
    extent = math.prod(value) if 0 not in value else math.prod(max(d, 1) for d in value)
    if extent > limits.max_rows * limits.max_features:
        raise ProtocolError(f"{where}.shape is too large")
    return tuple(value)


def _leaves(data: Any) -> list[int]:
    if type(data) is not list:
        return [data]
    out: list[int] = []
    for item in data:
        out.extend(_leaves(item) if type(item) is list else [item])
    return out


def _in_range(data: Any, arr: np.ndarray, lo: float, hi: float) -> bool:
    """Range check on the float copy, exact on the JSON integers where float64 could round (|x| >= 2**53)."""
    low, high = float(arr.min()), float(arr.max())
    if low < float(lo) or high > float(hi):  # both sides rounded alike: 2**63 - 1 is float 2**63 on both
        return False
    if high < 2**53 and low > -(2**53):
        return True
    values = _leaves(data)
    return lo <= min(values) and max(values) <= hi


def _requested_outputs(doc: dict[str, Any]) -> tuple[str, ...]:
    if "parameters" not in doc and "outputs" not in doc:  # the usual request: every output, as JSON
        return ()
    params = _object(doc.get("parameters", {}), "parameters")
    if params.get("binary_data_output") is True:
        raise ProtocolError("binary output tensors are not supported: request JSON outputs")
    outputs = doc.get("outputs", [])
    if type(outputs) is not list:
        raise ProtocolError("outputs must be a list")
    names: list[str] = []
    for i, out in enumerate(outputs):
        out = _object(out, f"outputs[{i}]")
        if type(out.get("name")) is not str:
            raise ProtocolError(f"outputs[{i}].name must be a string")
        out_params = _object(out.get("parameters", {}), f"outputs[{i}].parameters")
        if out_params.get("binary_data") is True:
            raise ProtocolError("binary output tensors are not supported: request JSON outputs")
        if "classification" in out_params:
            # Triton answers with "score:index" strings, which hardening could not rewrite.
            raise ProtocolError("the classification extension is not supported: request the raw output")
        names.append(out["name"])
    return tuple(names)


def _split_binary(
    body: bytes, content_type: str | None, header_length: int | None, limits: ParseLimits
) -> tuple[dict[str, Any], memoryview | None]:
    if header_length is None:
        require_json(content_type)
        return loads_object(body, limits.max_depth), None
    kind, _ = media_type(content_type)
    if kind not in (None, "application/json", "application/octet-stream"):
        raise ProtocolError("unsupported Content-Type for a binary tensor request")
    if not 0 <= header_length <= len(body):
        raise ProtocolError("Inference-Header-Content-Length does not fit the body")
    return loads_object(body[:header_length], limits.max_depth), memoryview(body)[header_length:]


def _tensor(
    inp: dict[str, Any], where: str, binary: memoryview | None, offset: int, limits: ParseLimits
) -> tuple[np.ndarray, int]:
    """Decode one input to an array shaped like its declared shape; returns the new binary offset."""
    shape = _shape(inp.get("shape"), where, limits)
    datatype = inp.get("datatype")
    if type(datatype) is not str:
        raise ProtocolError(f"{where}.datatype must be a string")
    spec = DATATYPES.get(datatype)
    if datatype == "BYTES":
        raise TextInput(f"{where}: BYTES input")
    if spec is None:
        named = f" {datatype}" if datatype == "BYTES" else ""  # never echo unknown client strings
        raise ProtocolError(f"{where}: unsupported datatype{named}")
    kind, dtype, lo, hi = spec
    count = math.prod(shape)
    size = _object(inp["parameters"], f"{where}.parameters").get("binary_data_size") if "parameters" in inp else None
    if size is not None:
        if binary is None:
            raise ProtocolError(f"{where}: binary_data_size without Inference-Header-Content-Length")
        if "data" in inp:
            raise ProtocolError(f"{where}: both data and binary_data_size given")
        itemsize = np.dtype(dtype).itemsize
        if type(size) is not int or size != count * itemsize:
            raise ProtocolError(f"{where}: binary_data_size does not match shape and datatype")
        if offset + size > len(binary):
            raise ProtocolError(f"{where}: binary data shorter than binary_data_size")
        raw = np.frombuffer(binary[offset : offset + size], dtype=np.dtype(dtype))
        if kind == "bool":
            raw = raw.view(np.uint8)
            if raw.size and raw.max() > 1:
                raise ProtocolError(f"{where}: BOOL binary data must be bytes 0 or 1")
        return raw.astype(np.float64).reshape(shape), offset + size
    if "data" not in inp:
        raise ProtocolError(f"{where}: missing data")
    arr = numeric_array(inp["data"], where=f"{where}.data", kind=kind)
    if arr.size != count:
        raise ProtocolError(f"{where}: data has {arr.size} elements but shape needs {count}")
    if kind == "int" and arr.size and not _in_range(inp["data"], arr, lo, hi):
        raise ProtocolError(f"{where}: value out of range for {datatype}")
    return arr.reshape(shape), offset


def parse_v2(
    body: bytes,
    *,
    content_type: str | None,
    limits: ParseLimits,
    inference_header_length: int | None = None,
) -> ParsedRequest:
    """Parse an OIP v2 request (JSON, or the binary tensor extension) into features."""
    doc, binary = _split_binary(body, content_type, inference_header_length, limits)
    _unknown_keys(doc, _TOP_KEYS, "request")
    if "id" in doc and type(doc["id"]) is not str:
        raise ProtocolError("id must be a string")
    outputs = _requested_outputs(doc)
    if "inputs" not in doc:
        raise ProtocolError("missing inputs")
    inputs = doc["inputs"]
    if type(inputs) is not list or not inputs:
        raise ProtocolError("inputs must be a non-empty list")
    parts: list[np.ndarray] = []
    names: list[str] = []
    datatypes: list[str] = []
    offset = 0
    for i, inp in enumerate(inputs):
        where = f"inputs[{i}]"
        inp = _object(inp, where)
        _unknown_keys(inp, _INPUT_KEYS, where)
        name = inp.get("name")
        if type(name) is not str:
            raise ProtocolError(f"{where}.name must be a string")
        if name in names:
            raise ProtocolError(f"{where}: duplicate input name")
        arr, offset = _tensor(inp, where, binary, offset, limits)
        names.append(name)
        datatypes.append(inp["datatype"])
        parts.append(arr)
    if binary is not None and offset != len(binary):
        raise ProtocolError("binary data longer than the inputs declare")
    return build_request(parts, protocol="v2", row_shape=None, names=tuple(names), outputs=outputs,
                         limits=limits, datatypes=tuple(datatypes))
