"""MLflow scoring server ``POST /invocations`` requests.

Wire format (MLflow 2.x), exactly one of these keys plus an optional ``"params"`` object::

    {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]], "index": [0, 1]}}
    {"dataframe_records": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]}
    {"instances": [[1, 2], [3, 4]]}            as KServe v1 / TF Serving row form
    {"inputs": [[1, 2], [3, 4]]}                as KServe v1 / TF Serving columnar form (list or object)

``dataframe_split``: ``columns`` (optional) must match the row width and ``index`` (optional) the row
count; cells must be numbers. ``dataframe_records``: every record has the same keys; cells are
numbers; columns follow the first record's key order.

``Content-Type: text/csv`` is accepted too: UTF-8, a header row (pandas ``read_csv`` semantics, as
MLflow uses: RFC 4180 quoting, so a quoted header name may hold a comma), then numeric rows of the
same width. A quoted number (``"1.5"``) is a number; a quoted cell holding a comma (``"1,5"``) is
not, and is refused with a message that says so. ``nan``/``inf`` cells parse as floats and are
left to the NaN/Inf policy.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import numpy as np

from guard_agent.protocols._base import (
    ParsedRequest,
    ParseLimits,
    ProtocolError,
    build_request,
    numeric_array,
)
from guard_agent.protocols._json import loads_object, media_type
from guard_agent.protocols.v1 import columnar_parts, instance_parts

__all__ = ["parse_mlflow"]

_DATA_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_SPLIT_KEYS = frozenset({"columns", "data", "index"})
_NUMBER = r" *[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity) *"
_ROW = re.compile(rf"{_NUMBER}(?:,{_NUMBER})*", re.IGNORECASE)


def _check_rows(n: int, limits: ParseLimits) -> None:
    if n == 0:
        raise ProtocolError("empty batch")
    if n > limits.max_rows:
        raise ProtocolError(f"too many rows: {n} > {limits.max_rows}")


def _split(value: Any, limits: ParseLimits) -> tuple[list[np.ndarray], tuple[str, ...]]:
    if type(value) is not dict:
        raise ProtocolError("dataframe_split must be an object")
    if value.keys() - _SPLIT_KEYS:
        raise ProtocolError("dataframe_split: unknown field (expected columns, data, index)")
    if "data" not in value:
        raise ProtocolError("dataframe_split: missing data")
    data = value["data"]
    if type(data) is not list:
        raise ProtocolError("dataframe_split.data must be a list of rows")
    _check_rows(len(data), limits)
    arr = numeric_array(data, where="dataframe_split.data")
    if arr.ndim != 2:
        raise ProtocolError("dataframe_split.data must be a list of rows of numbers")
    columns = value.get("columns")
    names: tuple[str, ...] = ()
    if columns is not None:
        if type(columns) is not list or any(type(c) is not str for c in columns):
            raise ProtocolError("dataframe_split.columns must be a list of strings")
        if len(columns) != arr.shape[1]:
            raise ProtocolError(f"dataframe_split: {len(columns)} columns but rows have {arr.shape[1]} cells")
        if len(set(columns)) != len(columns):
            raise ProtocolError("dataframe_split: duplicate column names")
        names = tuple(columns)
    index = value.get("index")
    if index is not None and (type(index) is not list or len(index) != arr.shape[0]):
        raise ProtocolError("dataframe_split.index must be a list with one entry per row")
    return [arr], names


def _records(value: Any, limits: ParseLimits) -> tuple[list[np.ndarray], tuple[str, ...]]:
    if type(value) is not list:
        raise ProtocolError("dataframe_records must be a list of objects")
    _check_rows(len(value), limits)
    if any(type(r) is not dict for r in value):
        raise ProtocolError("dataframe_records must be a list of objects")
    keys = tuple(value[0])
    if not keys:
        raise ProtocolError("dataframe_records[0] has no fields")
    key_set = set(keys)
    if any(r.keys() != key_set for r in value):
        raise ProtocolError("dataframe_records: records have different fields")
    table = [[r[k] for k in keys] for r in value]
    arr = numeric_array(table, where="dataframe_records")
    if arr.ndim != 2:
        raise ProtocolError("dataframe_records: cells must be numbers")
    return [arr], keys


def _csv(body: bytes, limits: ParseLimits) -> tuple[list[np.ndarray], tuple[str, ...]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("body is not valid UTF-8") from None
    if "\x00" in text:
        raise ProtocolError("CSV body contains NUL characters")
    try:
        table = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:
        raise ProtocolError("malformed CSV") from None
    table = [row for row in table if row]
    if not table:
        raise ProtocolError("CSV body has no header row")
    header, rows = table[0], table[1:]
    _check_rows(len(rows), limits)
    width = len(header)
    if width == 0 or width > limits.max_features:
        raise ProtocolError("CSV header has no columns or too many")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ProtocolError(f"CSV row {i + 1} has {len(row)} cells, header has {width}")
        joined = ",".join(row)  # one regex per row: cells without commas are separated by exactly these commas
        if joined.count(",") != width - 1:
            column = next(j for j, cell in enumerate(row) if "," in cell)
            raise ProtocolError(f"CSV row {i + 1}, column {column + 1}: a quoted cell holds a comma, which is not a "
                                "number (use '.' as the decimal separator, without thousands separators)")
        if _ROW.fullmatch(joined) is None:
            raise ProtocolError(f"CSV row {i + 1}: non-numeric cell")
    values = np.array(rows, dtype=np.float64)
    return [values], tuple(header)


def parse_mlflow(body: bytes, *, content_type: str | None, limits: ParseLimits) -> ParsedRequest:
    """Parse an MLflow ``/invocations`` request (JSON forms or CSV) into features."""
    kind, params = media_type(content_type)
    if kind == "text/csv":
        parts, names = _csv(body, limits)
        return build_request(parts, protocol="mlflow", row_shape=None, names=names, outputs=(), limits=limits)
    if kind not in (None, "application/json"):
        raise ProtocolError("unsupported Content-Type: expected application/json or text/csv")
    if params.get("charset", "utf-8") not in ("utf-8", "utf8"):
        raise ProtocolError("unsupported charset: JSON bodies must be UTF-8")
    doc = loads_object(body, limits.max_depth)
    present = [k for k in _DATA_KEYS if k in doc]
    if len(present) != 1:
        raise ProtocolError("expected exactly one of dataframe_split, dataframe_records, instances, inputs")
    if doc.keys() - {present[0], "params"}:
        raise ProtocolError("unknown top-level field: only one data field and params are accepted")
    if "params" in doc and type(doc["params"]) is not dict:
        raise ProtocolError("params must be an object")
    key = present[0]
    if key == "dataframe_split":
        parts, names = _split(doc[key], limits)
    elif key == "dataframe_records":
        parts, names = _records(doc[key], limits)
    elif key == "instances":
        parts, names = instance_parts(doc[key], limits, where="instances")
    else:
        parts, names = columnar_parts(doc[key], limits, where="inputs")
    return build_request(parts, protocol="mlflow", row_shape=None, names=names, outputs=(), limits=limits)
