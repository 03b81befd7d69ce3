"""Schema/range detector: per-feature bounds learned from reference data (extends the guard's declared
checks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._base import BaseDetector, require_array, require_param
from ._validation import Float32Array, FloatArray

_RELATIVE_FLOOR = 1e-9
_ABSOLUTE_FLOOR = 1e-30


def excess_scales(X: FloatArray, span: FloatArray, prior_rows: int) -> FloatArray:
    """Per-feature unit of excess: the feature's range, shrunk toward the pooled range when few rows set it.

    The pooled range is the median range of the non-constant features (a robust typical span). A feature whose
    range rests on k rows that differ from its median (a corner pixel inked a few times, a sparse column) gets
    the weighted geometric mean range^(k / (k + prior_rows)) * pooled^(prior_rows / (k + prior_rows)), never
    less than its own range: a rarely moving feature has a poorly estimated range, so a value past it is not
    many "range widths" out. Constant features get the pooled range (not 1.0 in raw units, by which any ink on a
    never-inked pixel would count as many range widths). Geometric, so that well-observed features (k >> prior_rows)
    keep their own range even when the others are in units 10^5 times larger.
    """
    positive = span[span > 0]
    pooled = float(np.median(positive)) if positive.size else 1.0
    typical = np.median(X, axis=0)
    moving = np.count_nonzero(np.not_equal(X, typical), axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # constant features (span 0) take the pooled range below
        log_shrunk = (moving * np.log(span) + prior_rows * np.log(pooled)) / (moving + prior_rows)
    shrunk = np.exp(log_shrunk) if prior_rows > 0 else span
    scale = np.where(span > 0, np.maximum(span, shrunk), pooled)
    # only a numerical floor (1/scale must fit float32): features in small units keep their own range, unlike
    # safe_scale's 1e-3 relative floor, which measured e.g. a 0.1-wide feature next to 1000-wide ones in 0.7s
    floor = max(_RELATIVE_FLOOR * float(scale.max()), _ABSOLUTE_FLOOR)
    return np.asarray(np.maximum(scale, floor), dtype=np.float64)


class SchemaRange(BaseDetector):
    """Score = number of features outside the learned [low, high] range + total excess in range units.

    Bounds are the `quantile` and `1 - quantile` quantiles of the reference (0.0 = min/max, the default: a
    reference row is never out of range). The excess of feature j is measured in units of its reference range,
    shrunk toward the pooled range for features that rarely move (see `excess_scales`; `prior_rows` is the
    shrinkage weight in rows, 0 = own range only). In-range rows score exactly 0, so this detector only fires
    on rows that leave the observed box. Beyond the largest calibration score the p-value follows an
    exponential tail: scale = the mean excess of the top calibration scores, never below 1 (one more feature out
    of range, or one more range width of excess, divides p by at most e); with too few non-zero calibration
    scores to fit, the unit exponential itself. Exponential, not the generalised Pareto of the distance
    detectors: the score grows by one per feature out of range, and its positive out-of-fold calibration scores
    are few (digits: 1% of rows) and cluster just above 1 (one feature barely out), so a Pareto shape raised by
    two standard errors left noise images with 16 pixels out of range at p ~ 5e-5.
    """

    score_name = "input.schema"
    min_tail_scale = 1.0
    exponential_tail = True

    def __init__(self, *, quantile: float = 0.0, prior_rows: int = 10) -> None:
        self.quantile = quantile
        self.prior_rows = prior_rows

    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        if not 0.0 <= self.quantile < 0.5:
            raise ValueError(f"quantile must be in [0, 0.5), got {self.quantile}")
        if isinstance(self.prior_rows, bool) or not isinstance(self.prior_rows, int) or self.prior_rows < 0:
            raise ValueError(f"prior_rows must be an integer >= 0, got {self.prior_rows!r}")
        low = np.quantile(X, self.quantile, axis=0)
        high = np.quantile(X, 1.0 - self.quantile, axis=0)
        self.low_ = low.astype(np.float32)
        self.high_ = high.astype(np.float32)
        self.inv_scale_ = (1.0 / excess_scales(X, high - low, self.prior_rows)).astype(np.float32)

    def _score(self, X: Float32Array) -> FloatArray:
        excess = np.maximum(X, self.low_)
        np.minimum(excess, self.high_, out=excess)
        np.subtract(X, excess, out=excess)
        np.abs(excess, out=excess)
        n_out = np.count_nonzero(excess, axis=1)
        total = excess @ self.inv_scale_
        return np.asarray(n_out + total, dtype=np.float64)

    def _params(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "prior_rows": self.prior_rows}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"low": self.low_, "high": self.high_, "inv_scale": self.inv_scale_}

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        d = self.n_features_in_
        self.quantile = float(require_param(params, "quantile", (float, int), "SchemaRange"))
        self.prior_rows = int(require_param(params, "prior_rows", int, "SchemaRange"))
        self.low_ = require_array(arrays, "low", (d,), "SchemaRange").astype(np.float32)
        self.high_ = require_array(arrays, "high", (d,), "SchemaRange").astype(np.float32)
        self.inv_scale_ = require_array(arrays, "inv_scale", (d,), "SchemaRange").astype(np.float32)
        if np.any(self.low_ > self.high_):
            raise ValueError("SchemaRange: low must not exceed high")
