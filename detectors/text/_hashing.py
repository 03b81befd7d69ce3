"""Hashed word and character n-grams: text to a fixed-width sparse vector without a vocabulary.

Stateless on purpose (scikit-learn's ``HashingVectorizer``): nothing to fit, nothing to store, and the
same text always hashes to the same columns, in the guard and in the notebook alike. Word uni- and
bigrams see substituted words; character 2..4-grams inside word boundaries see swapped, inserted or
look-alike characters. Each half is L2-normalised and the halves weighted equally, so every non-empty
text has unit norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer

__all__ = ["HASH_COLUMNS", "hashed"]

_HALF = 1 << 15
_TOKEN = r"(?u)\b\w+\b"  # noqa: S105 (a regex, not a password): single-character words count too
HASH_COLUMNS = 2 * _HALF
_WORDS = HashingVectorizer(analyzer="word", ngram_range=(1, 2), n_features=_HALF, alternate_sign=False,
                           norm="l2", lowercase=True, token_pattern=_TOKEN, dtype=np.float32)
_CHARS = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=_HALF, alternate_sign=False,
                           norm="l2", lowercase=True, dtype=np.float32)
_WEIGHT = np.float32(1.0 / np.sqrt(2.0))


def hashed(texts: Sequence[str]) -> sp.csr_matrix:
    """(len(texts), HASH_COLUMNS) float32 CSR rows of unit norm (zero rows for texts without n-grams)."""
    words = _WORDS.transform(texts)
    chars = _CHARS.transform(texts)
    words_empty = np.diff(words.indptr) == 0
    chars_empty = np.diff(chars.indptr) == 0
    # a text with only one kind of n-gram (e.g. one character) keeps unit norm on that half
    w_scale = np.where(chars_empty, 1.0, _WEIGHT).astype(np.float32)
    c_scale = np.where(words_empty, 1.0, _WEIGHT).astype(np.float32)
    return sp.hstack([sp.diags(w_scale) @ words, sp.diags(c_scale) @ chars], format="csr", dtype=np.float32)
