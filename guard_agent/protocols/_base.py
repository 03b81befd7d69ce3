"""Shared results, limits, the one error type, and strict conversion of JSON arrays to numbers.

Numbers beyond the float64 range (``1e400``, or a huge integer literal) become ``inf``/``-inf``: the
caller's NaN/Inf policy then applies, exactly as it does for the ``NaN``/``Infinity`` literals.
Integer literals longer than 4300 digits are refused as invalid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "Kind",
    "ParseLimits",
    "ParsedRequest",
    "ProtocolError",
    "TextInput",
    "build_request",
    "numeric_array",
]


class ProtocolError(ValueError):
    """message is safe to return to the client in a 400 (never echoes raw input values)."""


class TextInput(ProtocolError):
    """A numeric parser met strings: the dispatcher hands the body to the text parser instead."""


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on what one request may contain."""

    max_depth: int = 32  # JSON nesting
    max_rows: int = 4096  # batch size
    max_features: int = 1 << 20  # numbers per row
    max_texts: int = 256  # text inputs per request (all rows and string cells together)
    max_text_chars: int = 65536  # characters per text input


@dataclass(frozen=True)
class ParsedRequest:
    """The scored view of one request: one row of float64 features per instance."""

    features: np.ndarray  # 2-D float64, one row per instance, row-major flattening of each instance
    rows: int
    row_shape: tuple[int, ...]  # the shape of one instance before flattening, e.g. (8, 8) or (64,)
    protocol: str
    input_names: tuple[str, ...]
    requested_outputs: tuple[str, ...]  # v2 "outputs":[{"name":...}] if present
    input_datatypes: tuple[str, ...] = ()  # v2 datatype per input (e.g. "FP32", "UINT8"); empty for JSON protocols
    texts: tuple[str, ...] = ()  # text requests: one text per row (a row's strings joined by newlines)
    properties: Mapping[str, Any] = field(default_factory=dict)  # request.* facts the body gives (OpenAI routes)
    hashed_texts: Any = None  # text requests: detectors.text.hashed(texts), reused by a fitted text projection


Kind = Literal["float", "int", "bool"]
_LEAVES: dict[str, frozenset[type]] = {
    "float": frozenset({float, int}),
    "int": frozenset({int}),
    "bool": frozenset({bool}),
}


def _leaf_problem(types: set[type], kind: Kind, where: str) -> ProtocolError:
    """Name the first offending element type in a list that failed the fast type check."""
    if list in types:
        return ProtocolError(f"{where}: ragged data (lists mixed with scalars)")
    if dict in types:
        return ProtocolError(f"{where}: non-numeric data (an object inside the data)")
    if str in types:
        return TextInput(f"{where}: non-numeric data (a string inside the data)")
    if type(None) in types:
        return ProtocolError(f"{where}: non-numeric data (null inside the data)")
    if kind == "bool":
        return ProtocolError(f"{where}: BOOL data must be true/false")
    if bool in types:
        return ProtocolError(f"{where}: booleans where numbers are expected")
    if kind == "int":
        return ProtocolError(f"{where}: non-integer value in an integer tensor")
    return ProtocolError(f"{where}: non-numeric data")


def _shape_of(node: list[Any], allowed: frozenset[type], kind: Kind, where: str) -> tuple[int, ...]:
    """Validate a nested list of scalars and return its (rectangular) shape."""
    if not node:
        return (0,)
    types = set(map(type, node))
    if types <= allowed:
        return (len(node),)
    if types == {list}:
        inner = {_shape_of(child, allowed, kind, where) for child in node}
        if len(inner) != 1:
            raise ProtocolError(f"{where}: ragged data (rows of different lengths)")
        return (len(node), *inner.pop())
    raise _leaf_problem(types, kind, where)


def _huge_to_float(value: Any) -> Any:
    if isinstance(value, list):
        return [_huge_to_float(v) for v in value]
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def numeric_array(data: Any, *, where: str, kind: Kind = "float") -> np.ndarray:
    """Strictly convert a JSON scalar or nested list to float64 (no bools, strings or nulls as numbers).

    ``kind`` says which JSON scalars are acceptable: ``float`` (numbers), ``int`` (integers only) or
    ``bool`` (true/false only, as 0.0/1.0). The result keeps the nesting as its shape.
    """
    allowed = _LEAVES[kind]
    if type(data) in allowed:
        shape: tuple[int, ...] = ()
    elif type(data) is list:
        shape = _shape_of(data, allowed, kind, where)
    else:
        raise _leaf_problem({type(data)}, kind, where)
    try:
        arr = np.array(data, dtype=np.float64)
    except OverflowError:
        if kind == "int":
            raise ProtocolError(f"{where}: integer out of range") from None
        arr = np.array(_huge_to_float(data), dtype=np.float64)
    if arr.shape != shape:  # cannot happen after the checks above; keep numpy honest
        raise ProtocolError(f"{where}: ragged data")
    return arr


def build_request(
    parts: list[np.ndarray],
    *,
    protocol: str,
    row_shape: tuple[int, ...] | None,
    names: tuple[str, ...],
    outputs: tuple[str, ...],
    limits: ParseLimits,
    datatypes: tuple[str, ...] = (),
) -> ParsedRequest:
    """Concatenate per-row flattened parts (each shaped (rows, ...)) into the final 2-D feature matrix.

    ``row_shape`` None means: the shape of the single part's rows, or (total,) for several parts.
    """
    if not parts:
        raise ProtocolError("no inputs")
    rows = parts[0].shape[0] if parts[0].ndim else 0
    for p in parts:
        if p.ndim == 0:
            raise ProtocolError("an input has no batch dimension")
        if p.shape[0] != rows:
            raise ProtocolError("inputs have different batch sizes")
    if rows == 0:
        raise ProtocolError("empty batch")
    if rows > limits.max_rows:
        raise ProtocolError(f"too many rows: {rows} > {limits.max_rows}")
    flat = [p.reshape(rows, -1) for p in parts]
    width = flat[0].shape[1] if len(flat) == 1 else sum([f.shape[1] for f in flat])
    if width == 0:
        raise ProtocolError("inputs have no features")
    if width > limits.max_features:
        raise ProtocolError(f"too many features per row: {width} > {limits.max_features}")
    features = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
    features = np.ascontiguousarray(features, dtype=np.float64)
    if row_shape is None:
        row_shape = (parts[0].shape[1:] or (1,)) if len(parts) == 1 else (width,)  # numpy's shapes hold ints
    return ParsedRequest(
        features=features,
        rows=rows,
        row_shape=row_shape,
        protocol=protocol,
        input_names=names,
        requested_outputs=outputs,
        input_datatypes=datatypes,
    )
