"""A linear projection of hashed n-grams to a few dense features the numeric detectors can score.

Fitted: ``TruncatedSVD`` on reference texts, stored as plain arrays (the hashed columns the reference
uses and the components on those columns; an SVD component is zero on every column the reference never
touched, so nothing is lost). Unfitted default: a seeded Gaussian random projection (Johnson-Lindenstrauss),
so near-duplicate texts still land close together for the session trackers when no reference exists.

Besides the components, three features say what the projection cannot see: ``residual`` (the share of the
text's hashed vector outside the fitted subspace) and ``unseen_words`` / ``unseen_chars`` (the share of the
word and of the character n-grams the reference never used). All are 0..1 and are where vocabulary the model
never saw, gibberish and character swaps show up (character n-grams of real words are rarely unseen, swapped
letters make new ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD

from ._hashing import HASH_COLUMNS, hashed

__all__ = ["TextProjection"]

_SCHEMA = 1
_RANDOM_SEED = 0
_HALVES = np.zeros((HASH_COLUMNS, 2), dtype=np.float32)  # column -> word half (0) or character half (1)
_HALVES[: HASH_COLUMNS // 2, 0] = 1.0
_HALVES[HASH_COLUMNS // 2:, 1] = 1.0


class TextProjection:
    """Texts to ``n_components + 3`` float64 features: projection, ``residual``, ``unseen_words``, ``unseen_chars``."""

    def __init__(self, *, n_components: int = 32, seed: int = 0) -> None:
        self.n_components = n_components
        self.seed = seed

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (*(f"text.svd{i}" for i in range(self.n_components)), "text.residual", "text.unseen_words",
                "text.unseen_chars")

    def fit(self, texts: Sequence[str]) -> TextProjection:
        """Fit the SVD on reference texts (at least n_components + 1 non-empty ones)."""
        X = hashed(texts)
        used = np.flatnonzero(np.asarray(X.getnnz(axis=0)).ravel()).astype(np.int32)
        if used.size <= self.n_components or X.shape[0] <= self.n_components:
            raise ValueError(f"need more than {self.n_components} reference texts with words in them")
        svd = TruncatedSVD(n_components=self.n_components, algorithm="randomized", n_iter=7,
                           random_state=self.seed)
        svd.fit(X[:, used])
        self.columns_ = used
        self.components_ = np.ascontiguousarray(svd.components_, dtype=np.float32)
        return self

    @classmethod
    def random(cls, *, n_components: int = 32) -> TextProjection:
        """The unfitted default: a fixed random projection of every hashed column (no reference needed)."""
        self = cls(n_components=n_components, seed=_RANDOM_SEED)
        rng = np.random.default_rng(_RANDOM_SEED)
        self.columns_ = np.arange(HASH_COLUMNS, dtype=np.int32)
        comps = rng.standard_normal((n_components, HASH_COLUMNS)).astype(np.float32)
        self.components_ = comps / np.sqrt(np.float32(n_components))  # distances kept (Johnson-Lindenstrauss)
        return self

    def transform(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        """(len(texts), n_components + 3) features; an empty text maps to zeros with residual and unseen 1."""
        X = hashed(texts)
        return self.transform_hashed(X)

    def _full(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The components laid out over every hashed column (zero rows where the reference had nothing), and
        the known columns per half: sparse-dense products per request instead of column indexing."""
        cached: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = self.__dict__.get("_full_cache")
        if cached is None:
            full = np.zeros((HASH_COLUMNS, self.n_components), dtype=np.float32)
            full[self.columns_] = self.components_.T
            known = np.zeros((HASH_COLUMNS, 2), dtype=np.float32)
            known[self.columns_] = _HALVES[self.columns_]
            cached = (full, known)
            self.__dict__["_full_cache"] = cached
        return cached

    def transform_hashed(self, X: sp.csr_matrix) -> npt.NDArray[np.float64]:
        """Features of already hashed rows (see :func:`hashed`): a small dense product per row over the CSR
        arrays (a request holds a few texts; scipy's sparse machinery costs more than the arithmetic)."""
        weights, known_cols = self._full()
        n = X.shape[0]
        out = np.empty((n, self.n_components + 3))
        indptr, indices, data = X.indptr, X.indices, X.data
        for i in range(n):
            cols = indices[indptr[i]: indptr[i + 1]]
            vals = data[indptr[i]: indptr[i + 1]].astype(np.float64)
            proj = vals @ weights[cols] if cols.size else np.zeros(self.n_components)
            squares = vals * vals
            totals = squares @ _HALVES[cols] if cols.size else np.zeros(2)
            known = squares @ known_cols[cols] if cols.size else np.zeros(2)
            total = float(totals.sum())
            out[i, : self.n_components] = proj
            if total > 0:
                out[i, -3] = np.sqrt(min(1.0, max(0.0, 1.0 - float(proj @ proj) / total)))
            else:
                out[i, -3] = 1.0
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i, -2:] = np.where(totals > 0, np.clip(1.0 - known / totals, 0.0, 1.0), 1.0)
        return out

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able parameters and arrays for a profile component (no pickles)."""
        params = {"schema_version": _SCHEMA, "n_components": self.n_components, "seed": self.seed,
                  "hash_columns": HASH_COLUMNS}
        return params, {"columns": self.columns_, "components": self.components_}

    @classmethod
    def from_parts(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TextProjection:
        """Rebuild from :meth:`to_parts`; ValueError on anything inconsistent."""
        if params.get("schema_version") != _SCHEMA or params.get("hash_columns") != HASH_COLUMNS:
            raise ValueError("unsupported text projection schema or hashing width")
        k = params.get("n_components")
        if type(k) is not int or k < 1:
            raise ValueError("text projection n_components must be a positive integer")
        columns = np.asarray(arrays["columns"])
        comps = np.asarray(arrays["components"])
        if columns.ndim != 1 or columns.dtype.kind not in "iu" or comps.shape != (k, columns.size):
            raise ValueError("text projection arrays do not match n_components")
        if columns.size and (columns.min() < 0 or columns.max() >= HASH_COLUMNS):
            raise ValueError("text projection columns out of range")
        self = cls(n_components=k, seed=int(params.get("seed", 0)))
        self.columns_ = columns.astype(np.int32)
        self.components_ = np.ascontiguousarray(comps, dtype=np.float32)
        return self
