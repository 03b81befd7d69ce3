"""Response hardening: give a suspected extractor less information per query.

* ``top_k``: per row keep the k largest scores and set the rest to 0 (the shape stays, so clients
  do not break); values below 1 act as 1.
* ``round_digits``: round scores to N decimals (applied after top-k).
* ``label_only``: replace each probability row by its argmax label. v2: the output becomes
  ``{"name": <same>, "shape": [rows, 1], "datatype": "INT64", "data": [...]}``; v1/MLflow: a list of ints.

What counts as probabilities: v2 FP16/FP32/FP64 outputs shaped (rows, k > 1); v1/MLflow numeric
lists of rows of length k > 1 (also inside per-row objects and column dicts). Rounding also applies to
every other float value (a binary classifier's single score column leaks as much as a full row);
integer, boolean and string outputs are left as they are. Everything else in the body is kept.

``harden_response`` returns the new body, or None when the body could not be read or rewritten
(the caller decides whether to fail closed). With nothing to do it returns the body unchanged.
``harden_document`` does the same from an answer already decoded by ``read_response`` (the proxy
decodes once for the session trackers and hardening alike); it never modifies the document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from guard_agent.protocols.responses import numbers, read_response, v2_output_array

__all__ = ["HARDENABLE_PROTOCOLS", "Hardening", "harden_document", "harden_matrix", "harden_response", "round_values"]

HARDENABLE_PROTOCOLS = frozenset({"v2", "v1", "mlflow", "openai.chat", "openai.completions", "openai.embeddings"})
"""Protocols whose answers can be rewritten; a custom route's answer has no known shape. OpenAI answers are
hardened by ``guard_agent.llm`` (log-probabilities; embeddings carry none), not by ``harden_document``."""

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})


@dataclass(frozen=True)
class Hardening:
    """What to strip from answers; the default does nothing."""

    round_digits: int | None = None
    top_k: int | None = None
    label_only: bool = False

    @property
    def active(self) -> bool:
        """True when any rewrite is asked for."""
        return self.label_only or self.round_digits is not None or self.top_k is not None


class _Unreadable(Exception):
    """A part of the body that should be hardened could not be understood."""


def harden_matrix(p: np.ndarray, hardening: Hardening) -> np.ndarray:
    """Apply top-k and rounding to a (rows, k) score matrix; returns a new array."""
    out = np.array(p, dtype=np.float64)
    k = out.shape[1]
    if hardening.top_k is not None and hardening.top_k < k:
        keep = max(1, hardening.top_k)
        order = np.argsort(-out, axis=1, kind="stable")[:, :keep]
        mask = np.zeros(out.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=1)
        out = np.where(mask, out, 0.0)
    if hardening.round_digits is not None:
        out = round_values(out, hardening.round_digits)
    return out


def round_values(values: Any, digits: int) -> np.ndarray:
    """``np.round`` for model answers of any magnitude: values of 1e15 or more (no digits after the point left
    in float64) and non-finite ones are kept as they are, where ``np.round`` would scale them by 10**digits
    first and overflow them to inf (serialised as null)."""
    arr = np.array(values, dtype=np.float64)
    small = np.abs(arr) < 1e15
    arr[small] = np.round(arr[small], digits)
    return arr


def _round(arr: np.ndarray, hardening: Hardening) -> np.ndarray:
    return arr if hardening.round_digits is None else round_values(arr, hardening.round_digits)


def _argmax(p: np.ndarray) -> list[int]:
    labels: list[int] = np.argmax(p, axis=1).astype(np.int64).tolist()
    return labels


def _v2_output(out: Any, h: Hardening) -> Any:
    if type(out) is not dict:
        raise _Unreadable
    if out.get("datatype") not in _FLOAT_TYPES:
        return out
    arr = v2_output_array(out)
    if arr is None:
        raise _Unreadable
    if arr.ndim == 2 and arr.shape[1] > 1:
        if h.label_only:
            return {**out, "shape": [arr.shape[0], 1], "datatype": "INT64", "data": _argmax(arr)}
        return {**out, "data": harden_matrix(arr, h).ravel().tolist()}
    if h.round_digits is None:
        return out
    return {**out, "data": _round(arr, h).ravel().tolist()}


def _v2(doc: Any, h: Hardening) -> Any:
    if type(doc) is not dict or type(doc.get("outputs")) is not list:
        raise _Unreadable
    return {**doc, "outputs": [_v2_output(out, h) for out in doc["outputs"]]}


def _is_number(v: Any) -> bool:
    return type(v) is int or type(v) is float


def _record(rec: dict[str, Any], h: Hardening) -> Any:
    values = list(rec.values())
    if len(values) > 1 and all(_is_number(v) for v in values) and any(type(v) is float for v in values):
        row = np.array([values], dtype=np.float64)  # one probability row spread over named fields
        if h.label_only:
            return _argmax(row)[0]
        return dict(zip(rec, harden_matrix(row, h)[0].tolist(), strict=True))
    return {k: _value(v, h, in_row=True) for k, v in rec.items()}


def _value(value: Any, h: Hardening, *, in_row: bool = False) -> Any:
    """Harden a v1/MLflow predictions value; ``in_row`` means a 1-D list is one row of scores."""
    if type(value) is float:
        return value if h.round_digits is None else float(round_values(value, h.round_digits))
    if type(value) is dict:
        return {k: _value(v, h) for k, v in value.items()}
    if type(value) is not list or not value:
        return value
    if all(type(r) is dict for r in value):
        return [_record(r, h) for r in value]
    got = numbers(value)
    if got is None:
        if all(type(v) is str for v in value):
            return value  # class names
        raise _Unreadable
    arr, is_int = got
    if in_row and arr.ndim == 1 and arr.shape[0] > 1:
        if h.label_only:
            return _argmax(arr.reshape(1, -1))[0]
        return harden_matrix(arr.reshape(1, -1), h)[0].tolist()
    if arr.ndim == 2 and arr.shape[1] > 1:
        if h.label_only:
            return _argmax(arr)
        return harden_matrix(arr, h).tolist()
    if is_int:
        return value
    return _round(arr, h).tolist()


def _predictions(doc: Any, h: Hardening) -> Any:
    if type(doc) is list:
        return _value(doc, h)
    if type(doc) is not dict:
        raise _Unreadable
    for key in ("predictions", "outputs"):
        if key in doc:
            return {**doc, key: _value(doc[key], h)}
    raise _Unreadable


def harden_document(protocol: str, doc: Any, hardening: Hardening) -> bytes | None:
    """The hardened body for an answer decoded by ``read_response``; None when it could not be rewritten.

    ``hardening`` must be active (an inactive one has nothing to rewrite: the caller keeps its body).
    Never raises and never modifies ``doc``.
    """
    if doc is None:
        return None
    try:
        if protocol == "v2":
            new = _v2(doc, hardening)
        elif protocol in HARDENABLE_PROTOCOLS:
            new = _predictions(doc, hardening)
        else:
            return None
        return orjson.dumps(new)
    except Exception:  # _Unreadable, or anything unexpected: the caller decides, we never raise
        return None


def harden_response(protocol: str, body: bytes, hardening: Hardening) -> bytes | None:
    """Rewrite the probability outputs of a response; None when it could not be rewritten. Never raises."""
    if not hardening.active:
        return body
    return harden_document(protocol, read_response(body), hardening)
