"""Hashed word and character n-grams: text to a fixed-width sparse vector without a vocabulary.

Stateless on purpose: nothing to fit, nothing to store, and the same text always hashes to the same columns,
in the guard and in the notebook alike. Word uni- and bigrams see substituted words; character 2..4-grams
inside word boundaries see swapped, inserted or look-alike characters. Each half is L2-normalised and the
halves weighted equally, so every non-empty text has unit norm.

The result is exactly scikit-learn's ``HashingVectorizer`` (``alternate_sign=False``, ``norm="l2"``, the two
analyzers below; tests/text checks it), computed without its per-call validation and sparse-matrix plumbing:
the vectorizer's own analyzers give the n-grams, ``murmurhash3_32`` the columns (as ``FeatureHasher`` does),
so a short text costs a few hundred microseconds instead of more than a millisecond.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32

__all__ = ["CHARS", "HASH_COLUMNS", "WORDS", "hashed"]

_HALF = 1 << 15
_TOKEN = r"(?u)\b\w+\b"  # noqa: S105 (a regex, not a password): single-character words count too
HASH_COLUMNS = 2 * _HALF
WORDS = HashingVectorizer(analyzer="word", ngram_range=(1, 2), n_features=_HALF, alternate_sign=False,
                          norm="l2", lowercase=True, token_pattern=_TOKEN, dtype=np.float32)
CHARS = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=_HALF, alternate_sign=False,
                          norm="l2", lowercase=True, dtype=np.float32)
_ANALYZERS = ((WORDS.build_analyzer(), 0), (CHARS.build_analyzer(), _HALF))
_WEIGHT = 1.0 / np.sqrt(2.0)


def _half(ngrams: list[str], offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and L2-normalised counts of one half (FeatureHasher's abs(murmurhash3) mod n_features)."""
    counts: Counter[int] = Counter(abs(murmurhash3_32(g, seed=0)) % _HALF for g in ngrams)
    if not counts:
        return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float64)
    cols = np.fromiter(counts.keys(), dtype=np.int32, count=len(counts))
    vals = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    order = np.argsort(cols)
    return cols[order] + offset, vals[order] / np.sqrt(np.dot(vals, vals))


def hashed(texts: Sequence[str]) -> sp.csr_matrix:
    """(len(texts), HASH_COLUMNS) float32 CSR rows of unit norm (zero rows for texts without n-grams)."""
    indptr = [0]
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    for text in texts:
        halves = [_half(analyze(text), offset) for analyze, offset in _ANALYZERS]
        weight = _WEIGHT if all(v.size for _, v in halves) else 1.0  # one kind of n-gram only: keep unit norm
        for cols, vals in halves:
            indices.append(cols)
            data.append(vals * weight)
        indptr.append(indptr[-1] + sum(c.size for c, _ in halves))
    idx = np.concatenate(indices) if indices else np.empty(0, dtype=np.int32)
    val = np.concatenate(data).astype(np.float32) if data else np.empty(0, dtype=np.float32)
    return sp.csr_matrix((val, idx, np.asarray(indptr, dtype=np.int32)), shape=(len(texts), HASH_COLUMNS))
