"""k-nearest-neighbour distance to the reference set, exact for small sets and a k-means cell index for
large ones."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from ._base import BaseDetector, require_array, require_param
from ._validation import Float32Array, FloatArray, feature_scale

_CHUNK = 256  # rows per exact batch: bounds the temporary distance matrix to CHUNK x n_reference


class KNNDistance(BaseDetector):
    """Score = Euclidean distance (standardised features) to the k-th nearest reference row.

    `index="auto"` chooses an exact brute-force search when the reference has at most `exact_max` rows and an
    inverted-file index otherwise: the reference is split into ~sqrt(n) k-means cells and a query is compared
    with the rows of its `n_probe` nearest cells only (default: ~1/16 of the cells, at least 2).
    The approximate distance is never below the exact one; `bench/detector_cost.py` reports the AUROC it
    costs.
    References larger than `max_reference` (default 20,000) are randomly subsampled to it, which bounds the
    per-request cost (~sqrt(n) cells probed). With fewer reference rows than k, k is reduced to the number of rows.
    """

    score_name = "ood.knn"

    def __init__(
        self,
        *,
        n_neighbors: int = 5,
        index: str = "auto",
        exact_max: int = 2048,
        n_probe: int | None = None,
        max_reference: int | None = 20000,
        standardize: bool = True,
        seed: int = 0,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.index = index
        self.exact_max = exact_max
        self.max_reference = max_reference
        self.n_probe = n_probe
        self.standardize = standardize
        self.seed = seed

    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        if self.index not in ("auto", "exact", "ivf"):
            raise ValueError(f"index must be 'auto', 'exact' or 'ivf', got {self.index!r}")
        mean = X.mean(axis=0)
        scale = feature_scale(X) if self.standardize else np.ones(X.shape[1])
        if self.max_reference is not None and X.shape[0] > self.max_reference:
            # bounded per-request cost whatever the reference size: keep a seeded random subset
            keep = np.random.default_rng(self.seed).choice(X.shape[0], size=self.max_reference, replace=False)
            X = X[np.sort(keep)]
        n = X.shape[0]
        Z = (X - mean) / scale
        kind = self.index if self.index != "auto" else ("exact" if n <= self.exact_max else "ivf")
        n_cells = max(2, round(math.sqrt(n))) if kind == "ivf" else 1
        if kind == "ivf" and n < 2 * n_cells:
            kind, n_cells = "exact", 1
        if kind == "ivf":
            with warnings.catch_warnings():  # duplicate rows can leave fewer distinct cells: harmless here
                warnings.simplefilter("ignore", ConvergenceWarning)
                km = KMeans(n_clusters=n_cells, n_init=1, random_state=self.seed, max_iter=100).fit(Z)
            cells = km.labels_
            order = np.argsort(cells, kind="stable")
            counts = np.bincount(cells, minlength=n_cells)
            self.centroids_ = km.cluster_centers_.astype(np.float32)
            Z = Z[order]
            self.offsets_ = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            default_probe = max(2, math.ceil(n_cells / 16))
            self.n_probe_ = min(n_cells, self.n_probe or default_probe)
        else:
            self.centroids_ = np.zeros((0, X.shape[1]), dtype=np.float32)
            self.offsets_ = np.array([0, n], dtype=np.int64)
            self.n_probe_ = 1
        self.index_kind_ = kind
        self.k_ = min(self.n_neighbors, n)
        self.mean_ = mean.astype(np.float32)
        self.inv_scale_ = (1.0 / scale).astype(np.float32)
        self._set_reference(np.ascontiguousarray(Z, dtype=np.float32))

    def _set_reference(self, ref: Float32Array) -> None:
        self.reference_ = ref
        # augmented rows [-2 r, |r|^2] turn "|r|^2 - 2 r.z" into one mat-vec with [z, 1]
        self._ref_aug = np.ascontiguousarray(
            np.hstack([-2.0 * ref, np.einsum("ij,ij->i", ref, ref)[:, None]]), dtype=np.float32
        )
        cent = self.centroids_
        self._cent_aug = np.ascontiguousarray(
            np.hstack([-2.0 * cent, np.einsum("ij,ij->i", cent, cent)[:, None]]), dtype=np.float32
        )
        off = self.offsets_
        self._bounds = [(int(off[c]), int(off[c + 1])) for c in range(off.shape[0] - 1)]

    def _score(self, X: Float32Array) -> FloatArray:
        Z = (X - self.mean_) * self.inv_scale_
        Z_aug = np.empty((Z.shape[0], Z.shape[1] + 1), dtype=np.float32)
        Z_aug[:, :-1] = Z
        Z_aug[:, -1] = 1.0
        z_sq = np.einsum("ij,ij->i", Z, Z)
        if self.index_kind_ == "exact":
            return self._score_exact(Z_aug, z_sq)
        return self._score_ivf(Z_aug, z_sq)

    def _kth(self, sq: np.ndarray) -> np.ndarray:
        k = self.k_
        part = np.partition(sq, k - 1, axis=-1)[..., k - 1]
        return np.sqrt(np.maximum(part, 0.0))

    def _score_exact(self, Z_aug: Float32Array, z_sq: Float32Array) -> FloatArray:
        out = np.empty(Z_aug.shape[0], dtype=np.float64)
        ref_aug_t = self._ref_aug.T
        for start in range(0, Z_aug.shape[0], _CHUNK):
            stop = start + _CHUNK
            sq = Z_aug[start:stop] @ ref_aug_t
            sq += z_sq[start:stop, None]
            out[start:stop] = self._kth(sq)
        return out

    def _score_ivf(self, Z_aug: Float32Array, z_sq: Float32Array) -> FloatArray:
        out = np.empty(Z_aug.shape[0], dtype=np.float64)
        cell_sq = Z_aug @ self._cent_aug.T
        n_probe, k, ref_aug, bounds = self.n_probe_, self.k_, self._ref_aug, self._bounds
        probes = np.argpartition(cell_sq, n_probe - 1, axis=1)[:, :n_probe]
        for i in range(Z_aug.shape[0]):
            z = Z_aug[i]
            # cells are contiguous: one mat-vec per probed cell, no gather copy of reference rows
            sq = np.concatenate([ref_aug[a:b] @ z for a, b in (bounds[c] for c in probes[i])])
            if sq.shape[0] < k:  # tiny cells: fall back to the whole reference rather than fail
                sq = ref_aug @ z
            out[i] = self._kth(sq + z_sq[i])
        return out

    def _params(self) -> dict[str, Any]:
        return {
            "n_neighbors": self.n_neighbors,
            "index": self.index,
            "exact_max": self.exact_max,
            "n_probe": self.n_probe,
            "max_reference": self.max_reference,
            "standardize": self.standardize,
            "seed": self.seed,
            "index_kind": self.index_kind_,
            "k": self.k_,
            "n_probe_used": self.n_probe_,
            "n_reference": int(self.reference_.shape[0]),
            "n_cells": int(self.centroids_.shape[0]),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean_,
            "inv_scale": self.inv_scale_,
            "reference": self.reference_,
            "centroids": self.centroids_,
            "offsets": self.offsets_,
        }

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        d, owner = self.n_features_in_, "KNNDistance"
        kind = params.get("index_kind")
        if kind not in ("exact", "ivf"):
            raise ValueError(f"{owner}: index_kind must be 'exact' or 'ivf', got {kind!r}")
        n_ref = require_param(params, "n_reference", int, owner)
        n_cells = require_param(params, "n_cells", int, owner)
        k = require_param(params, "k", int, owner)
        n_probe = require_param(params, "n_probe_used", int, owner)
        if not (1 <= k <= n_ref and n_probe >= 1 and (kind == "exact" or n_probe <= n_cells)):
            raise ValueError(
                f"{owner}: inconsistent k={k}, n_probe={n_probe}, n_reference={n_ref}, n_cells={n_cells}"
            )
        for key in ("n_neighbors", "index", "exact_max", "n_probe", "max_reference", "standardize", "seed"):
            setattr(self, key, params.get(key))
        self.index_kind_, self.k_, self.n_probe_ = kind, k, n_probe
        self.mean_ = require_array(arrays, "mean", (d,), owner).astype(np.float32)
        self.inv_scale_ = require_array(arrays, "inv_scale", (d,), owner).astype(np.float32)
        ref = require_array(arrays, "reference", (n_ref, d), owner).astype(np.float32)
        self.centroids_ = require_array(arrays, "centroids", (n_cells, d), owner).astype(np.float32)
        offsets = require_array(arrays, "offsets", (None,), owner).astype(np.int64)
        expected = n_cells + 1 if kind == "ivf" else 2
        if (
            offsets.shape[0] != expected
            or offsets[0] != 0
            or offsets[-1] != n_ref
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError(f"{owner}: offsets do not partition the {n_ref} reference rows")
        self.offsets_ = offsets
        self._set_reference(np.ascontiguousarray(ref))
