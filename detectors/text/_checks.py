"""Cheap character-level checks for what character-level evasion does, each its own score in [0, 1].

Four statistics per text (counts, so a text without the trick scores exactly 0):

- ``text.invisible``: zero-width and other invisible format characters (Unicode category Cf: ZWSP, ZWJ,
  ZWNJ, bidi controls, the BOM, soft hyphen, tag characters), variation selectors and Hangul fillers;
- ``text.control``: control characters other than tab, newline and carriage return, private-use,
  unassigned and surrogate code points;
- ``text.confusable``: characters that NFKC folds to ASCII letters or digits (full-width, mathematical and
  circled letters) plus words whose letters mix scripts (Latin with Cyrillic or Greek: "paypal" written
  with a Cyrillic "a");
- ``text.length``: characters, two-sided against the reference.

Fitted on reference texts, each count is calibrated like the detectors (1 - conformal p-value against
the reference), so a reference where ZWJ emoji are common does not flag them. Unfitted, any occurrence
scores 1 and length scores 0: the caller has no reference to compare with.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CHECK_NAMES", "TextChecks", "text_statistics"]

CHECK_NAMES: tuple[str, ...] = ("text.invisible", "text.control", "text.confusable", "text.length")
_SCHEMA = 1
_EXTRA_INVISIBLE = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x180E, 0x034F})
_ALLOWED_CONTROLS = frozenset("\t\n\r")
_WORD = re.compile(r"\w+")
_CJK = frozenset({"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC", "HALFWIDTH"})


@lru_cache(maxsize=65536)
def _kind(ch: str) -> int:
    """0 plain, 1 invisible, 2 control, 3 confusable."""
    cp = ord(ch)
    if ch.isascii():
        return 2 if (cp < 0x20 or cp == 0x7F) and ch not in _ALLOWED_CONTROLS else 0
    cat = unicodedata.category(ch)
    if cat == "Cf" or cp in _EXTRA_INVISIBLE or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
        return 1
    if cat in ("Cc", "Co", "Cn", "Cs"):
        return 2
    folded = unicodedata.normalize("NFKC", ch)
    if folded.isascii() and folded.isalnum():
        return 3
    return 0


@lru_cache(maxsize=65536)
def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    if ch.isascii():
        return "LATIN"
    first = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return "CJK" if first in _CJK else first


def _mixed_words(text: str) -> int:
    count = 0
    for word in _WORD.findall(text):
        if word.isascii():
            continue
        scripts = {s for s in map(_script, word) if s is not None}
        count += len(scripts) > 1
    return count


def text_statistics(texts: Sequence[str]) -> npt.NDArray[np.float64]:
    """(len(texts), 4): invisible, control, confusable counts and the length in characters."""
    out = np.zeros((len(texts), 4))
    for i, text in enumerate(texts):
        counts = [0, 0, 0, 0]
        if not text.isascii():
            for ch in text:
                counts[_kind(ch)] += 1
            counts[3] += _mixed_words(text)
        else:
            counts[2] = sum(1 for ch in text if (ord(ch) < 0x20 or ch == "\x7f") and ch not in _ALLOWED_CONTROLS)
        out[i] = (counts[1], counts[2], counts[3], len(text))
    return out


def _upper_p(ref_sorted: npt.NDArray[np.float64], values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Conformal p-value of values against the reference, upper tail: (1 + #{ref >= v}) / (n + 1)."""
    n = ref_sorted.size
    at_or_above = n - np.searchsorted(ref_sorted, values, side="left")
    return np.asarray((1.0 + at_or_above) / (n + 1.0), dtype=np.float64)


class TextChecks:
    """The four cheap checks; ``fit`` stores the reference statistics (sorted) for calibration."""

    def __init__(self) -> None:
        self.reference_: npt.NDArray[np.float64] | None = None

    def fit(self, texts: Sequence[str]) -> TextChecks:
        stats = text_statistics(texts)
        if stats.shape[0] < 10:
            raise ValueError("need at least 10 reference texts to calibrate the text checks")
        stats[:, 3] = np.log1p(stats[:, 3])
        self.reference_ = np.sort(stats, axis=0)
        return self

    def score(self, texts: Sequence[str]) -> dict[str, npt.NDArray[np.float64]]:
        """Per-text scores in [0, 1] (higher = more anomalous), one array per name in CHECK_NAMES."""
        return self.score_statistics(text_statistics(texts))

    def score_statistics(self, stats: npt.NDArray[np.float64]) -> dict[str, npt.NDArray[np.float64]]:
        counts = stats[:, :3]
        ref = self.reference_
        if ref is None:
            scores = (counts > 0).astype(np.float64)
            length = np.zeros(stats.shape[0])
        else:
            scores = np.zeros_like(counts)
            for j in range(3):
                present = counts[:, j] > 0
                if present.any() and ref[-1, j] == 0:
                    # no reference text had any: an occurrence is beyond the whole reference, which a conformal
                    # p-value of a small reference (1 / (n + 1)) would understate below the policy's threshold
                    scores[present, j] = 1.0
                elif present.any():
                    scores[present, j] = 1.0 - _upper_p(ref[:, j], counts[present, j])
            length = self._length_score(np.log1p(stats[:, 3]), ref[:, 3])
        return {CHECK_NAMES[j]: scores[:, j] for j in range(3)} | {"text.length": length}

    @staticmethod
    def _length_score(values: npt.NDArray[np.float64], ref: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Two-sided conformal score; beyond the reference range it keeps growing towards 1 with the distance
        (in units of the reference's interquartile range of log lengths), so far outside means near 1."""
        n = ref.size
        upper = _upper_p(ref, values)
        lower = (1.0 + np.searchsorted(ref, values, side="right")) / (n + 1.0)
        p = np.minimum(1.0, 2.0 * np.minimum(upper, lower))
        iqr = max(float(ref[(3 * n) // 4] - ref[n // 4]), 0.1)
        beyond = np.maximum(values - ref[-1], ref[0] - values)
        p = np.where(beyond > 0, p * np.exp(-np.maximum(beyond, 0.0) / iqr), p)
        return np.asarray(1.0 - p, dtype=np.float64)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.reference_ is None:
            raise ValueError("TextChecks is not fitted")
        return {"schema_version": _SCHEMA}, {"reference": self.reference_}

    @classmethod
    def from_parts(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TextChecks:
        if params.get("schema_version") != _SCHEMA:
            raise ValueError("unsupported text checks schema")
        ref = np.asarray(arrays["reference"], dtype=np.float64)
        if ref.ndim != 2 or ref.shape[1] != 4 or ref.shape[0] < 10 or not np.isfinite(ref).all():
            raise ValueError("text checks reference must be (rows >= 10, 4) and finite")
        self = cls()
        self.reference_ = np.sort(ref, axis=0)
        return self


