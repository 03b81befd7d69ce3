"""Input checks shared by every detector: the library must be safe even when the caller did not check."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
_NEGLIGIBLE = 1e-30


def _checked_shape(X: npt.ArrayLike, n_features: int | None, name: str) -> np.ndarray:
    """The array as 2-D with a numeric dtype and the expected width; values not checked yet."""
    arr = np.asarray(X)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x features), got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features, expected {n_features}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no features")
    return arr


def _require_finite(arr: np.ndarray, name: str, extra: str = "") -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN or infinity{extra} (first at row {bad[0]}, feature {bad[1]})")


def as_rows(X: npt.ArrayLike, *, n_features: int | None = None, name: str = "X") -> FloatArray:
    """Return `X` as a finite 2-D float64 array or raise ValueError saying what is wrong.

    A 1-D array is taken as a single row. Empty batches and non-numeric dtypes are refused.
    """
    out = np.asarray(_checked_shape(X, n_features, name), dtype=np.float64)
    _require_finite(out, name)
    return out


def as_rows32(X: npt.ArrayLike, *, n_features: int, name: str = "X") -> Float32Array:
    """Validated float32 C-contiguous rows: the dtype every detector scores in (fast; sklearn's trees too).

    Checked once, after the cast: values beyond the float32 range become infinite and are refused too.
    """
    arr = _checked_shape(X, n_features, name)
    with np.errstate(over="ignore"):
        out32 = np.ascontiguousarray(arr, dtype=np.float32)
    _require_finite(out32, name, " or a value beyond the float32 range")
    return out32


def safe_scale(values: FloatArray) -> FloatArray:
    """Per-feature scale with zero (constant features) replaced: relative floor, then 1.0 if all constant.

    Scales below 1e-3 of the root-mean-square scale are raised to it, so a near-constant feature cannot
    explode distances; scales below 1e-30 count as zero, so 1/scale always fits in float32.
    """
    values = np.abs(np.asarray(values, dtype=np.float64))
    positive = values[values > _NEGLIGIBLE]
    floor = 1e-3 * float(np.sqrt(np.mean(positive**2))) if positive.size else 1.0
    return np.asarray(np.where(values > floor, values, max(floor, _NEGLIGIBLE)), dtype=np.float64)


def feature_scale(X: FloatArray, prior_rows: int = 10) -> FloatArray:
    """Per-feature standardisation scale: the standard deviation, shrunk toward the pooled one for features
    that rarely move.

    A feature that differs from its median in only k rows (a corner pixel inked a few times, a sparse column)
    has a tiny, poorly estimated spread: divided by it, one ordinary non-zero value becomes hundreds of
    units and benign rows that hold it get distances far beyond everything else (digits: the calibration
    maximum 2,000x the 90th percentile), which forces every tail model to be so heavy that nothing can reach a
    small p-value. The scale is the weighted geometric mean std^(k / (k + prior_rows)) *
    pooled^(prior_rows / (k + prior_rows)), never below the feature's own std (pooled = the median std of the
    non-constant features), like `schema.excess_scales` does for ranges; features seen moving in many rows
    keep their own scale. Then `safe_scale`.
    """
    std = X.std(axis=0)
    positive = std[std > _NEGLIGIBLE]
    if positive.size == 0 or prior_rows <= 0:
        return safe_scale(std)
    pooled = float(np.median(positive))
    moving = np.count_nonzero(np.not_equal(X, np.median(X, axis=0)), axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # constant features: log(0) -> -inf, weight 0 below
        log_shrunk = (moving * np.log(np.maximum(std, _NEGLIGIBLE)) + prior_rows * np.log(pooled)) / (
            moving + prior_rows
        )
    return safe_scale(np.maximum(std, np.exp(log_shrunk)))


_BIG = float(np.finfo(np.float64).max)


def finite_scores(scores: FloatArray) -> FloatArray:
    """Map overflowed scores (inf, or NaN from inf - inf) to the largest float: they are maximally
    anomalous."""
    if np.isfinite(scores).all():  # the usual case, several times cheaper than nan_to_num on a few rows
        return scores
    return np.nan_to_num(scores, nan=_BIG, posinf=_BIG, neginf=0.0)
