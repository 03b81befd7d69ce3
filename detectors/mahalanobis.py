"""Mahalanobis distance with a Ledoit-Wolf shrinkage covariance, optional PCA whitening, optional per-class
means."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.covariance import LedoitWolf

from ._base import BaseDetector, require_array, require_param
from ._validation import Float32Array, FloatArray, feature_scale


def n_components_for(eigvals_desc: FloatArray, n_components: int | float | None) -> int:
    """Number of leading components: all (None), a count (int), or the smallest explaining a variance
    share."""
    d = int(eigvals_desc.shape[0])
    if n_components is None:
        return d
    if isinstance(n_components, int) and not isinstance(n_components, bool):
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        return int(min(n_components, d))
    if not 0.0 < float(n_components) <= 1.0:
        raise ValueError(f"a fractional n_components must be in (0, 1], got {n_components}")
    total = float(eigvals_desc.sum())
    if total <= 0:
        return 1
    share = np.cumsum(eigvals_desc) / total
    needed = int(np.searchsorted(share, float(n_components) - 1e-12)) + 1
    return min(d, needed)


class Mahalanobis(BaseDetector):
    """Squared Mahalanobis distance to the reference mean (or, with labels, to the nearest class mean).

    With labels the covariance is the pooled within-class one (Lee et al., NeurIPS 2018); the score is the
    minimum over classes. Ledoit-Wolf shrinkage keeps the covariance invertible for few rows or collinear
    features; features are standardised first and eigenvalues are floored at 1e-9 of the largest (and at 1e-9
    absolute), so constant features and constant data stay finite: any deviation from a constant is far.
    `n_components` keeps only the leading principal directions (PCA whitening); None keeps all.
    """

    score_name = "ood.mahalanobis"

    def __init__(self, *, n_components: int | float | None = None, use_labels: bool = True) -> None:
        self.n_components = n_components
        self.use_labels = use_labels

    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        # standardising first leaves the distance unchanged (affine invariance) but conditions the covariance
        scale = feature_scale(X)
        X = X / scale
        if y is not None and self.use_labels:
            classes, inverse = np.unique(y, return_inverse=True)
            means = np.stack([X[inverse == c].mean(axis=0) for c in range(classes.size)])
            centered = X - means[inverse]
        else:
            means = X.mean(axis=0, keepdims=True)
            centered = X - means
        if X.shape[0] >= 2:
            cov = LedoitWolf(assume_centered=True, store_precision=False).fit(centered).covariance_  # eigh below
        else:
            cov = np.zeros((X.shape[1], X.shape[1]))
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
        k = n_components_for(eigvals, self.n_components)
        top = float(eigvals[0])
        floor = max(1e-9 * top, 1e-9)  # standardised units: a non-constant feature has variance 1
        whiten = eigvecs[:, :k] / np.sqrt(np.maximum(eigvals[:k], floor)) / scale[:, None]
        self.whiten_ = whiten.astype(np.float32)
        self.class_centers_ = (means @ (whiten * scale[:, None])).astype(np.float32)
        self.n_components_ = k

    def _score(self, X: Float32Array) -> FloatArray:
        z = X @ self.whiten_
        centers = self.class_centers_
        if centers.shape[0] == 1:
            diff = z - centers
            return np.asarray(np.einsum("ij,ij->i", diff, diff), dtype=np.float64)
        diff3 = z[:, None, :] - centers[None, :, :]
        return np.asarray(np.einsum("ijk,ijk->ij", diff3, diff3).min(axis=1), dtype=np.float64)

    def _params(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "use_labels": self.use_labels,
            "n_components_kept": self.n_components_,
            "n_classes": int(self.class_centers_.shape[0]),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"whiten": self.whiten_, "class_centers": self.class_centers_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        d, owner = self.n_features_in_, "Mahalanobis"
        k = require_param(params, "n_components_kept", int, owner)
        n_classes = require_param(params, "n_classes", int, owner)
        self.n_components = params.get("n_components")
        self.use_labels = bool(params.get("use_labels", True))
        self.n_components_ = k
        self.whiten_ = require_array(arrays, "whiten", (d, k), owner).astype(np.float32)
        self.class_centers_ = require_array(arrays, "class_centers", (n_classes, k), owner).astype(np.float32)
