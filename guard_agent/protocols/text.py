"""Text requests: the same four protocols when their inputs are strings.

The numeric parsers raise ``TextInput`` when they meet a string (or a v2 ``BYTES`` input); the dispatcher
then parses the body again here. Numeric bodies never pay for this.

- OIP v2: every input ``BYTES`` (``parameters.content_type`` absent or ``"str"``, as MLServer sends),
  ``data`` a flat or nested list of ``prod(shape)`` strings, or the binary extension where each element
  is a 4-byte little-endian length and that many bytes. ``shape[0]`` is the batch; the strings of one
  row (of every input) are joined with newlines into that row's text.
- KServe v1: ``instances`` (or ``inputs``) a list of strings, of lists of strings, or of objects whose
  fields are strings; ``inputs`` may also be an object of named string lists.
- MLflow: ``dataframe_split`` / ``dataframe_records`` whose cells are all strings, or the v1 forms.
- Custom routes: the pointer names a string (one row) or a list of the above.

Text and numbers mixed in one request are refused (the guard would score only half of it). Every string
must be valid Unicode (JSON escapes of lone surrogates are refused; binary elements must be UTF-8) and
within ``ParseLimits.max_text_chars``; at most ``max_texts`` strings per request. The features are the
default random projection (``detectors.text``); the guard re-projects with a fitted text profile.
"""

from __future__ import annotations

import math
from typing import Any

from detectors.text import TextProjection, hashed
from guard_agent.protocols._base import ParsedRequest, ParseLimits, ProtocolError
from guard_agent.protocols._json import loads_object, media_type, require_json
from guard_agent.protocols.pointer import resolve_pointer, split_pointer
from guard_agent.protocols.v2 import _requested_outputs, _split_binary

__all__ = ["default_projection", "parse_text_request", "text_request"]

_V2_TOP = frozenset({"id", "parameters", "inputs", "outputs"})
_V2_INPUT = frozenset({"name", "shape", "datatype", "data", "parameters"})
_V1_KEYS = frozenset({"instances", "inputs", "signature_name"})
_MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_DEFAULT: list[TextProjection] = []
_MIXED = "text and numbers mixed (a string among non-strings: only all-text inputs are accepted)"


def default_projection() -> TextProjection:
    """The shared unfitted projection (built once: a fixed seeded matrix)."""
    if not _DEFAULT:
        _DEFAULT.append(TextProjection.random())
    return _DEFAULT[0]


class _Budget:
    """Counts strings against the per-request limit and checks each one."""

    def __init__(self, limits: ParseLimits) -> None:
        self.limits = limits
        self.count = 0

    def take(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise ProtocolError(f"{where}: {_MIXED}")
        self.count += 1
        if self.count > self.limits.max_texts:
            raise ProtocolError(f"too many text inputs: more than {self.limits.max_texts}")
        if len(value) > self.limits.max_text_chars:
            raise ProtocolError(f"{where}: a text is longer than {self.limits.max_text_chars} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{where}: text is not valid Unicode (a lone surrogate escape)") from None
        return value


def text_request(texts: list[str], *, protocol: str, names: tuple[str, ...] = (), outputs: tuple[str, ...] = (),
                 datatypes: tuple[str, ...] = (), limits: ParseLimits) -> ParsedRequest:
    """A ParsedRequest for texts, one per row, with the default projection as features."""
    if not texts:
        raise ProtocolError("empty batch")
    if len(texts) > limits.max_rows:
        raise ProtocolError(f"too many rows: {len(texts)} > {limits.max_rows}")
    rows = hashed(texts)
    features = default_projection().transform_hashed(rows)
    return ParsedRequest(features=features, rows=len(texts), row_shape=(features.shape[1],), protocol=protocol,
                         input_names=names, requested_outputs=outputs, input_datatypes=datatypes,
                         texts=tuple(texts), hashed_texts=rows)


def _row_text(node: Any, where: str, budget: _Budget, keys: tuple[str, ...] | None = None) -> str:
    """One row: a string, a (nested) list of strings, or an object of strings (fields in ``keys`` order)."""
    if type(node) is str:
        return budget.take(node, where)
    if type(node) is list:
        if not node:
            raise ProtocolError(f"{where}: an empty row")
        return "\n".join(_row_text(item, where, budget) for item in node)
    if type(node) is dict:
        if "b64" in node:
            raise ProtocolError(f"{where}: b64 binary values are not text and cannot be scored")
        if keys is None or node.keys() != set(keys):
            raise ProtocolError(f"{where}: instances have different fields")
        return "\n".join(_row_text(node[k], where, budget) for k in keys)
    raise ProtocolError(f"{where}: {_MIXED}")


def _rows(batch: Any, where: str, limits: ParseLimits, budget: _Budget) -> tuple[list[str], tuple[str, ...]]:
    if type(batch) is not list:
        raise ProtocolError(f"{where} must be a list")
    if not batch:
        raise ProtocolError("empty batch")
    if len(batch) > limits.max_rows:
        raise ProtocolError(f"too many rows: {len(batch)} > {limits.max_rows}")
    keys: tuple[str, ...] = tuple(batch[0]) if type(batch[0]) is dict else ()
    if type(batch[0]) is dict and not keys:
        raise ProtocolError(f"{where}[0] has no fields")
    texts = [_row_text(item, where, budget, keys if keys else None) for item in batch]
    return texts, keys


def _columns(inputs: dict[str, Any], where: str, limits: ParseLimits, budget: _Budget) -> list[str]:
    """Columnar named tensors: every value a list with the same batch size; rows joined across tensors."""
    if not inputs:
        raise ProtocolError(f"{where} has no tensors")
    columns = [_rows(v, f"{where}: tensor #{j}", limits, budget)[0] for j, v in enumerate(inputs.values())]
    if len({len(c) for c in columns}) != 1:
        raise ProtocolError("inputs have different batch sizes")
    return ["\n".join(parts) for parts in zip(*columns, strict=True)]


def _v1_texts(doc: dict[str, Any], limits: ParseLimits, budget: _Budget) -> tuple[list[str], tuple[str, ...]]:
    if "instances" in doc:
        return _rows(doc["instances"], "instances", limits, budget)
    inputs = doc["inputs"]
    if type(inputs) is dict:
        return _columns(inputs, "inputs", limits, budget), tuple(inputs)
    return _rows(inputs, "inputs", limits, budget)


def _flatten(node: Any) -> list[Any]:
    """Row-major leaves of a nested list (a scalar is one leaf); depth is bounded by the JSON limit."""
    if type(node) is not list:
        return [node]
    out: list[Any] = []
    for item in node:
        out.extend(_flatten(item) if type(item) is list else (item,))
    return out


def _v2_strings(inp: dict[str, Any], where: str, count: int, binary: memoryview | None, offset: int,
                budget: _Budget) -> tuple[list[str], int]:
    size = inp.get("parameters", {}).get("binary_data_size")
    if size is None:
        if "data" not in inp:
            raise ProtocolError(f"{where}: missing data")
        flat = _flatten(inp["data"])
        if len(flat) != count:
            raise ProtocolError(f"{where}: data has {len(flat)} elements but shape needs {count}")
        return [budget.take(v, f"{where}.data") for v in flat], offset
    if binary is None:
        raise ProtocolError(f"{where}: binary_data_size without Inference-Header-Content-Length")
    if "data" in inp:
        raise ProtocolError(f"{where}: both data and binary_data_size given")
    if type(size) is not int or size < 0 or offset + size > len(binary):
        raise ProtocolError(f"{where}: binary data shorter than binary_data_size")
    chunk, pos, out = binary[offset: offset + size], 0, []
    for _ in range(count):
        if pos + 4 > size:
            raise ProtocolError(f"{where}: BYTES binary data ends inside an element length")
        length = int.from_bytes(chunk[pos: pos + 4], "little")
        pos += 4
        if pos + length > size:
            raise ProtocolError(f"{where}: BYTES binary element longer than binary_data_size")
        try:
            value = bytes(chunk[pos: pos + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{where}: BYTES element is not UTF-8 text (only UTF-8 is accepted)") from None
        pos += length
        out.append(budget.take(value, where))
    if pos != size:
        raise ProtocolError(f"{where}: binary_data_size does not match the BYTES elements")
    return out, offset + size


def _parse_v2(body: bytes, content_type: str | None, limits: ParseLimits,
              header_length: int | None) -> ParsedRequest:
    doc, binary = _split_binary(body, content_type, header_length, limits)
    if doc.keys() - _V2_TOP:
        raise ProtocolError("request: unknown field (allowed: id, inputs, outputs, parameters)")
    if "id" in doc and type(doc["id"]) is not str:
        raise ProtocolError("id must be a string")
    outputs = _requested_outputs(doc)
    inputs = doc.get("inputs")
    if type(inputs) is not list or not inputs:
        raise ProtocolError("inputs must be a non-empty list")
    budget, offset = _Budget(limits), 0
    rows_of: list[list[str]] = []
    names: list[str] = []
    batch: int | None = None
    for i, inp in enumerate(inputs):
        where = f"inputs[{i}]"
        if type(inp) is not dict:
            raise ProtocolError(f"{where} must be an object")
        if inp.keys() - _V2_INPUT:
            raise ProtocolError(f"{where}: unknown field (allowed: data, datatype, name, parameters, shape)")
        if inp.get("datatype") != "BYTES":
            if any(type(v) is str for v in _flatten(inp.get("data"))):
                raise ProtocolError(f"{where}: a string inside the data of a numeric input (text needs BYTES)")
            raise ProtocolError(f"{where}: text (BYTES) and numeric inputs cannot be mixed in one request")
        name = inp.get("name")
        if type(name) is not str or name in names:
            raise ProtocolError(f"{where}.name must be a unique string")
        params = inp.get("parameters", {})
        if type(params) is not dict:
            raise ProtocolError(f"{where}.parameters must be an object")
        if params.get("content_type", "str") != "str":
            raise ProtocolError(f"{where}: BYTES inputs must be text (parameters.content_type \"str\")")
        shape = inp.get("shape")
        if type(shape) is not list or not shape or any(type(d) is not int or d < 0 for d in shape):
            raise ProtocolError(f"{where}.shape must be a non-empty list of non-negative integers")
        rows, count = shape[0], math.prod(shape)
        if rows == 0:
            raise ProtocolError("empty batch")
        if count == 0:  # rows of no text at all: nothing to score, and the model would get empty rows
            raise ProtocolError(f"{where}.shape has no elements")
        if count > limits.max_texts or rows > limits.max_rows:
            raise ProtocolError(f"too many text inputs: more than {limits.max_texts}")
        if batch is not None and rows != batch:
            raise ProtocolError("inputs have different batch sizes")
        batch = rows
        strings, offset = _v2_strings(inp, where, count, binary, offset, budget)
        per = count // rows
        rows_of.append(["\n".join(strings[r * per: (r + 1) * per]) for r in range(rows)])
        names.append(name)
    if binary is not None and offset != len(binary):
        raise ProtocolError("binary data longer than the inputs declare")
    texts = ["\n".join(parts) for parts in zip(*rows_of, strict=True)]
    return text_request(texts, protocol="v2", names=tuple(names), outputs=outputs,
                        datatypes=("BYTES",) * len(names), limits=limits)


def _parse_v1(body: bytes, content_type: str | None, limits: ParseLimits) -> ParsedRequest:
    require_json(content_type)
    doc = loads_object(body, limits.max_depth)
    if doc.keys() - _V1_KEYS or ("instances" in doc) == ("inputs" in doc):
        raise ProtocolError("expected exactly one of instances or inputs (and signature_name)")
    texts, names = _v1_texts(doc, limits, _Budget(limits))
    return text_request(texts, protocol="v1", names=names, limits=limits)


def _parse_mlflow(body: bytes, content_type: str | None, limits: ParseLimits) -> ParsedRequest:
    kind, _ = media_type(content_type)
    if kind == "text/csv":
        raise ProtocolError("text columns are accepted in JSON bodies only (dataframe_split or dataframe_records)")
    require_json(content_type)
    doc = loads_object(body, limits.max_depth)
    present = [k for k in _MLFLOW_KEYS if k in doc]
    if len(present) != 1 or doc.keys() - {present[0], "params"}:
        raise ProtocolError("expected exactly one of dataframe_split, dataframe_records, instances, inputs")
    key, budget = present[0], _Budget(limits)
    names: tuple[str, ...] = ()
    if key == "dataframe_split":
        split = doc[key]
        if type(split) is not dict or "data" not in split:
            raise ProtocolError("dataframe_split must be an object with data")
        texts, _ = _rows(split["data"], "dataframe_split.data", limits, budget)
        columns = split.get("columns")
        if type(columns) is list and all(type(c) is str for c in columns):
            names = tuple(columns)
    elif key == "dataframe_records":
        texts, names = _rows(doc[key], "dataframe_records", limits, budget)
        if not names:
            raise ProtocolError("dataframe_records must be a list of objects")
    else:
        texts, names = _v1_texts({key: doc[key]}, limits, budget)
    return text_request(texts, protocol="mlflow", names=names, limits=limits)


def _parse_custom(body: bytes, pointer: str | None, content_type: str | None, limits: ParseLimits) -> ParsedRequest:
    if pointer is None:
        raise ProtocolError("bad pointer: custom route has no pointer")
    split_pointer(pointer)
    require_json(content_type)
    node = resolve_pointer(loads_object(body, limits.max_depth), pointer)
    budget = _Budget(limits)
    if type(node) is str:
        texts = [budget.take(node, f"pointer {pointer}")]
    else:
        texts, _ = _rows(node, f"pointer {pointer}", limits, budget)
    return text_request(texts, protocol="custom", limits=limits)


def parse_text_request(protocol: str, body: bytes, *, content_type: str | None, pointer: str | None,
                       limits: ParseLimits, inference_header_length: int | None) -> ParsedRequest:
    """Parse a body whose inputs are text (the numeric parser raised ``TextInput``)."""
    if protocol == "v2":
        return _parse_v2(body, content_type, limits, inference_header_length)
    if protocol == "v1":
        return _parse_v1(body, content_type, limits)
    if protocol == "mlflow":
        return _parse_mlflow(body, content_type, limits)
    if protocol == "custom":
        return _parse_custom(body, pointer, content_type, limits)
    raise ProtocolError("unknown protocol")


