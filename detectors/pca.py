"""PCA reconstruction error: distance of a row from the linear subspace the reference data lives in."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._base import BaseDetector, require_array, require_param
from ._validation import Float32Array, FloatArray, feature_scale
from .mahalanobis import n_components_for


class PCAReconstruction(BaseDetector):
    """Score = squared residual after projecting the standardised row on the leading principal components.

    `n_components` is a count or a variance share (default 0.9). At most d - 1 components are kept so the
    residual is not identically zero; with a single feature the score is always 0 and the detector never
    fires.
    """

    score_name = "ood.pca"

    def __init__(self, *, n_components: int | float = 0.9, standardize: bool = True) -> None:
        self.n_components = n_components
        self.standardize = standardize

    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        mean = X.mean(axis=0)
        scale = feature_scale(X) if self.standardize else np.ones(X.shape[1])
        Z = (X - mean) / scale
        _, sing, vt = np.linalg.svd(Z, full_matrices=False)
        eig = np.zeros(X.shape[1])
        eig[: sing.size] = sing**2
        k = min(n_components_for(eig, self.n_components), max(X.shape[1] - 1, 1), vt.shape[0])
        self.mean_ = mean.astype(np.float32)
        self.inv_scale_ = (1.0 / scale).astype(np.float32)
        self.components_ = np.ascontiguousarray(vt[:k].T, dtype=np.float32)
        if X.shape[1] == 1:
            self.components_ = np.ones((1, 1), dtype=np.float32)

    def _score(self, X: Float32Array) -> FloatArray:
        Z = (X - self.mean_) * self.inv_scale_
        resid = Z - (Z @ self.components_) @ self.components_.T
        return np.asarray(np.einsum("ij,ij->i", resid, resid), dtype=np.float64)

    def _params(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "standardize": self.standardize,
            "n_components_kept": int(self.components_.shape[1]),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "inv_scale": self.inv_scale_, "components": self.components_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        d, owner = self.n_features_in_, "PCAReconstruction"
        k = require_param(params, "n_components_kept", int, owner)
        self.n_components = params.get("n_components", 0.9)
        self.standardize = bool(params.get("standardize", True))
        self.mean_ = require_array(arrays, "mean", (d,), owner).astype(np.float32)
        self.inv_scale_ = require_array(arrays, "inv_scale", (d,), owner).astype(np.float32)
        self.components_ = require_array(arrays, "components", (d, k), owner).astype(np.float32)
