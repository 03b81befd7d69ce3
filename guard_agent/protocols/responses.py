"""What the model answered: predicted labels and class probabilities, read from upstream responses.

Response shapes understood (the trackers need the prediction; nothing here ever raises)::

    v2      {"model_name": "m", "outputs": [
                {"name": "predict_proba", "shape": [n, 10], "datatype": "FP64", "data": [...]},
                {"name": "predict", "shape": [n, 1], "datatype": "INT64", "data": [...]}]}
    v1      {"predictions": [3, 1]}  labels      {"predictions": [[0.1, 0.9], ...]}  probabilities
            {"predictions": [{"probabilities": [...], "classes": 1}, ...]}   TF named outputs per row
            {"outputs": [[...]]} or {"outputs": {"name": [...]}}              TF columnar
    mlflow  {"predictions": [...]} with the v1 list forms, or {"predictions": {"col": [...]}},
            or (MLflow 1.x) a bare list

Probabilities: the first float (FP*) output / value shaped (rows, k > 1). Labels: the first integer
output / value shaped (rows,) or (rows, 1); else the argmax of the probabilities. A list of JSON
floats is a regression answer: neither labels nor probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard_agent.protocols._base import ProtocolError, numeric_array
from guard_agent.protocols._json import loads_response

__all__ = ["ParsedResponse", "numbers", "parse_document", "parse_response", "read_response", "v2_output_array"]

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


@dataclass(frozen=True)
class ParsedResponse:
    """The model's answer, as far as the guard can tell."""

    labels: np.ndarray | None  # int64 per row: the predicted class
    probabilities: np.ndarray | None  # (rows, classes) float64 when the model returned scores


def numbers(value: Any) -> tuple[np.ndarray, bool] | None:
    """A JSON number or rectangular numeric list as float64, and whether every element was an integer."""
    try:
        return numeric_array(value, where="response", kind="int"), True
    except ProtocolError:
        pass
    try:
        return numeric_array(value, where="response", kind="float"), False
    except ProtocolError:
        return None


def v2_output_array(out: Any) -> np.ndarray | None:
    """A v2 output tensor reshaped to its declared shape; None when it is not numeric or inconsistent."""
    if type(out) is not dict:
        return None
    shape = out.get("shape")
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        return None
    try:  # "float" accepts every JSON number: the same array ``numbers`` gives, without a failed int attempt
        arr = numeric_array(out.get("data"), where="response", kind="float")
    except ProtocolError:
        return None
    if arr.size != math.prod(shape):
        return None
    return arr.reshape(shape)


def _labels_from(arr: np.ndarray, rows: int) -> np.ndarray | None:
    """One whole number per row, or None: NaN, infinities, fractions or numbers beyond int64 are not labels
    (casting them would give garbage classes to the trackers, and a RuntimeWarning)."""
    if arr.shape not in ((rows,), (rows, 1)):
        return None
    flat = arr.reshape(rows)
    if flat.dtype.kind == "f" and not (np.all(np.isfinite(flat)) and np.all(np.abs(flat) < 2.0**62)
                                       and np.all(flat == np.floor(flat))):
        return None
    return flat.astype(np.int64)


def _v2(doc: Any, rows: int) -> ParsedResponse | None:
    if type(doc) is not dict or type(doc.get("outputs")) is not list:
        return None
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    for out in doc["outputs"]:
        arr = v2_output_array(out)
        if arr is None:
            continue
        datatype = out.get("datatype")
        if datatype in _FLOAT_TYPES and probs is None and arr.ndim == 2 and arr.shape[0] == rows \
                and arr.shape[1] > 1:
            probs = arr
        elif datatype in _INT_TYPES and labels is None:
            labels = _labels_from(arr, rows)
    return _finish(labels, probs)


def _finish(labels: np.ndarray | None, probs: np.ndarray | None) -> ParsedResponse:
    if labels is None and probs is not None:
        labels = np.argmax(probs, axis=1).astype(np.int64)
    return ParsedResponse(labels=labels, probabilities=probs)


def _column_candidates(columns: list[Any], rows: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """First probability-like and first label-like column among named or positional columns."""
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    scalar_cols: list[np.ndarray] = []
    for column in columns:
        got = numbers(column)
        if got is None or got[0].ndim == 0 or got[0].shape[0] != rows:
            continue
        arr, is_int = got
        if arr.ndim == 2 and arr.shape[1] > 1 and probs is None:
            probs = arr
        elif is_int and labels is None:
            labels = _labels_from(arr, rows)
        if arr.ndim == 1 and not is_int:
            scalar_cols.append(arr)
    if probs is None and len(scalar_cols) > 1:  # e.g. pandas records {"0": 0.1, "1": 0.9}
        probs = np.stack(scalar_cols, axis=1)
    return labels, probs


def _from_value(value: Any, rows: int) -> ParsedResponse | None:
    if type(value) is dict:
        labels, probs = _column_candidates(list(value.values()), rows)
        return _finish(labels, probs)
    if type(value) is not list:
        return None
    if value and all(type(r) is dict for r in value):
        keys = list(value[0])
        if any(r.keys() != set(keys) for r in value):
            return None
        labels, probs = _column_candidates([[r[k] for r in value] for k in keys], rows)
        return _finish(labels, probs)
    got = numbers(value)
    if got is None or got[0].ndim == 0 or got[0].shape[0] != rows:
        return ParsedResponse(labels=None, probabilities=None) if got is None else None
    arr, is_int = got
    if arr.ndim == 2 and arr.shape[1] > 1:
        return _finish(None, arr)
    if is_int:
        return _finish(_labels_from(arr, rows), None)
    return ParsedResponse(labels=None, probabilities=None)


def _predictions(doc: Any, rows: int) -> ParsedResponse | None:
    if type(doc) is list:
        return _from_value(doc, rows)
    if type(doc) is not dict:
        return None
    if "predictions" in doc:
        return _from_value(doc["predictions"], rows)
    if "outputs" in doc:
        return _from_value(doc["outputs"], rows)
    return None


def read_response(body: bytes) -> Any:
    """Decode an upstream answer once, for ``parse_document`` and ``harden_document`` to share.

    None when the body is not JSON. Never raises: a bad answer must not fail the request path.
    """
    try:
        return loads_response(body)
    except Exception:
        return None


def parse_document(protocol: str, doc: Any, rows: int) -> ParsedResponse | None:
    """Labels/probabilities from an already decoded answer (``read_response``); None when unreadable.

    Never raises, and never modifies ``doc`` (hardening may read it afterwards).
    """
    if doc is None:
        return None
    try:
        if protocol == "v2":
            return _v2(doc, rows)
        if protocol in ("v1", "mlflow"):
            return _predictions(doc, rows)
        return None
    except Exception:  # the contract is "never raise": a bad answer must not fail the request path
        return None


def parse_response(protocol: str, body: bytes, rows: int) -> ParsedResponse | None:
    """Labels/probabilities from an upstream response body; None when it cannot be read. Never raises."""
    return parse_document(protocol, read_response(body), rows)
