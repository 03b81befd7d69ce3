"""Schema/range detector: per-feature bounds learned from reference data (extends the guard's declared
checks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._base import BaseDetector, require_array, require_param
from ._validation import Float32Array, FloatArray, safe_scale


class SchemaRange(BaseDetector):
    """Score = number of features outside the learned [low, high] range + total excess in range units.

    Bounds are the `quantile` and `1 - quantile` quantiles of the reference (0.0 = min/max, the default: a
    reference row is never out of range). The excess of feature j is measured in units of its reference range
    (high - low); constant features use a unit scale, so any deviation from the constant counts. In-range rows
    score exactly 0, so this detector only fires on rows that leave the observed box. Beyond the largest
    calibration score the p-value decays with a fixed unit scale (no tail is fitted to a discrete score):
    one more feature out of range, or one more range-width of excess, divides p by e; far out-of-range rows
    reach 1.0.
    """

    score_name = "input.schema"
    fixed_tail_scale = 1.0  # beyond the calibration max, each further feature out of range divides p by e

    def __init__(self, *, quantile: float = 0.0) -> None:
        self.quantile = quantile

    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        if not 0.0 <= self.quantile < 0.5:
            raise ValueError(f"quantile must be in [0, 0.5), got {self.quantile}")
        low = np.quantile(X, self.quantile, axis=0)
        high = np.quantile(X, 1.0 - self.quantile, axis=0)
        span = high - low
        self.low_ = low.astype(np.float32)
        self.high_ = high.astype(np.float32)
        self.inv_scale_ = (1.0 / np.where(span > 0, safe_scale(span), 1.0)).astype(np.float32)

    def _score(self, X: Float32Array) -> FloatArray:
        excess = np.maximum(X, self.low_)
        np.minimum(excess, self.high_, out=excess)
        np.subtract(X, excess, out=excess)
        np.abs(excess, out=excess)
        n_out = np.count_nonzero(excess, axis=1)
        total = excess @ self.inv_scale_
        return np.asarray(n_out + total, dtype=np.float64)

    def _params(self) -> dict[str, Any]:
        return {"quantile": self.quantile}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"low": self.low_, "high": self.high_, "inv_scale": self.inv_scale_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        d = self.n_features_in_
        self.quantile = float(require_param(params, "quantile", (float, int), "SchemaRange"))
        self.low_ = require_array(arrays, "low", (d,), "SchemaRange").astype(np.float32)
        self.high_ = require_array(arrays, "high", (d,), "SchemaRange").astype(np.float32)
        self.inv_scale_ = require_array(arrays, "inv_scale", (d,), "SchemaRange").astype(np.float32)
        if np.any(self.low_ > self.high_):
            raise ValueError("SchemaRange: low must not exceed high")
