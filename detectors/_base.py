"""The shape every stateless detector shares: fit, score (higher = more anomalous), threshold, p-values,
state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from ._validation import Float32Array, FloatArray, as_rows, as_rows32, finite_scores

State = tuple[dict[str, Any], dict[str, np.ndarray]]


class NotFittedError(RuntimeError):
    """Raised when a detector is used before `fit` (or before `infer_threshold` for p-values)."""


def conformal_threshold(sorted_scores: FloatArray, fpr: float) -> float:
    """Smallest threshold t with at most `fpr` of future in-distribution scores above it (split-conformal
    rule).

    Fires when score > t. With n calibration scores the k-th smallest, k = ceil((1 - fpr)(n + 1)), is used;
    when n is too small for the requested rate (k > n) the threshold is +inf: the detector never fires.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    n = sorted_scores.shape[0]
    k = math.ceil((1.0 - fpr) * (n + 1))
    if k > n:
        return math.inf
    return float(sorted_scores[max(k, 1) - 1])


# smallest p-value reported: keeps log(p) finite. Below ~1.1e-16 the calibrated score 1 - p rounds to exactly
# 1.0, which therefore means "beyond every calibration row by many tail scales" (e.g. far out of range).
P_FLOOR = 1e-300


def tail_scale(sorted_cal: FloatArray) -> float | None:
    """Scale of an exponential tail fitted to the top calibration scores (max(10, 10%) exceedances), or None.

    Used only beyond the largest calibration score, where the empirical p-value is stuck at 1/(n + 1): there
    p = exp(-(s - max) / scale) / (n + 1), so far-out rows get ever smaller p-values (which the combined score
    and thresholds above 1 - 1/(n + 1) need). None (no tail) with fewer than 20 scores or a flat top.
    """
    n = sorted_cal.shape[0]
    if n < 20:
        return None
    m = min(n - 1, max(10, math.ceil(0.1 * n)))
    base = float(sorted_cal[n - m - 1])
    scale = float(np.mean(sorted_cal[n - m :] - base))
    return scale if math.isfinite(scale) and scale > 0 else None


def conformal_p_values(sorted_cal: FloatArray, scores: npt.ArrayLike, tail: float | None = None) -> FloatArray:
    """p = (1 + #{calibration >= s}) / (n + 1): a valid p-value for an exchangeable new score, never 0.

    Beyond the largest calibration score the exponential `tail` (see `tail_scale`) continues the decay.
    """
    s = np.asarray(scores, dtype=np.float64)
    n = sorted_cal.shape[0]
    n_ge = n - np.searchsorted(sorted_cal, s, side="left")
    p = np.asarray((1.0 + n_ge) / (n + 1.0), dtype=np.float64)
    if tail is None:
        return p
    top = float(sorted_cal[-1])
    if s.size == 1 and not float(s.reshape(-1)[0]) > top:  # hot path: a single in-range row
        return p
    beyond = s > top
    if beyond.any():
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            p_tail = np.exp(-(s - top) / tail) / (n + 1.0)
        p = np.where(beyond, np.nan_to_num(p_tail, nan=0.0), p)
        np.maximum(p, P_FLOOR, out=p)
    return p


def loo_p_values(sorted_cal: FloatArray, cal_scores: npt.ArrayLike) -> FloatArray:
    """Leave-one-out p-values of the calibration scores themselves: #{calibration >= s_i} / n.

    Each calibration row is compared with the other n - 1 under the same +1 rule, so the result has the same
    distribution as a fresh row's p-value; used to calibrate the combined score without a second split. No
    tail here: one extreme calibration row must not push the combined calibration to the p-value floor.
    """
    s = np.asarray(cal_scores, dtype=np.float64)
    n = sorted_cal.shape[0]
    n_ge = n - np.searchsorted(sorted_cal, s, side="left")
    return np.asarray(n_ge / float(n), dtype=np.float64)


class BaseDetector:
    """Common machinery. Subclasses implement `_fit`, `_score`, `_params`, `_arrays` and `_restore`.

    Constructors are keyword-only and only store parameters; fitted attributes end in `_`.
    """

    score_name: ClassVar[str] = ""
    # p-values beyond the calibration maximum: None = exponential tail fitted to the top calibration scores
    # (see `tail_scale`); a number = that fixed tail scale in raw-score units
    fixed_tail_scale: ClassVar[float | None] = None
    n_features_in_: int
    calibration_scores_: FloatArray
    threshold_: float
    fpr_: float
    tail_scale_: float | None

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike | None = None) -> Self:
        """Learn from reference rows `X` (labels `y` are used by detectors that can, ignored by others)."""
        X64 = as_rows(X)
        labels = None if y is None else np.asarray(y)
        if labels is not None and labels.shape != (X64.shape[0],):
            raise ValueError(f"y must have one label per row: shape {labels.shape}, {X64.shape[0]} rows")
        self._fit(X64, labels)
        self.n_features_in_ = X64.shape[1]
        return self

    def score_samples(self, X: npt.ArrayLike) -> FloatArray:
        """Raw anomaly score per row; higher = more anomalous. Rejects NaN/Inf and a wrong feature count."""
        self._check_fitted()
        X32 = as_rows32(X, n_features=self.n_features_in_)
        with np.errstate(over="ignore", invalid="ignore"):
            return finite_scores(self._score(X32))

    def infer_threshold(self, X_val: npt.ArrayLike, fpr: float) -> float:
        """Keep held-out in-distribution scores for p-values and return the threshold at the target FPR."""
        scores = self.score_samples(X_val)
        self.calibration_scores_ = np.sort(scores.astype(np.float64))
        self.fpr_ = float(fpr)
        self.threshold_ = conformal_threshold(self.calibration_scores_, fpr)
        fixed = self.fixed_tail_scale
        self.tail_scale_ = tail_scale(self.calibration_scores_) if fixed is None else fixed
        return self.threshold_

    def p_values(self, scores: npt.ArrayLike) -> FloatArray:
        """Conformal p-values of raw scores against the stored calibration scores (small = anomalous)."""
        if not hasattr(self, "calibration_scores_"):
            raise NotFittedError(f"{type(self).__name__}: call infer_threshold before p_values")
        return conformal_p_values(self.calibration_scores_, scores, self.tail_scale_)

    # -- persistence -------------------------------------------------------------------------------------
    def get_state(self) -> State:
        """JSON-able parameters and named arrays that fully describe the fitted detector (no pickle)."""
        self._check_fitted()
        params = {"n_features": self.n_features_in_, **self._params()}
        arrays = dict(self._arrays())
        if hasattr(self, "calibration_scores_"):
            params["fpr"] = self.fpr_
            params["threshold"] = None if math.isinf(self.threshold_) else self.threshold_
            params["tail_scale"] = self.tail_scale_
            arrays["calibration_scores"] = self.calibration_scores_
        return params, arrays

    @classmethod
    def from_state(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Self:
        """Rebuild from `get_state` output; raises ValueError when a parameter or array shape is
        inconsistent."""
        obj = cls.__new__(cls)
        n_features = params.get("n_features")
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1:
            raise ValueError(f"{cls.__name__}: n_features must be a positive integer, got {n_features!r}")
        obj.n_features_in_ = n_features
        obj._restore(dict(params), dict(arrays))
        if "calibration_scores" in arrays:
            cal = np.asarray(arrays["calibration_scores"], dtype=np.float64)
            if cal.ndim != 1 or cal.size == 0 or not np.isfinite(cal).all() or np.any(np.diff(cal) < 0):
                raise ValueError(f"{cls.__name__}: calibration_scores must be a sorted, finite, non-empty vector")
            fpr, threshold = params.get("fpr"), params.get("threshold")
            if not isinstance(fpr, float) or not 0.0 < fpr < 1.0:
                raise ValueError(f"{cls.__name__}: fpr must be a float in (0, 1), got {fpr!r}")
            obj.tail_scale_ = check_tail_scale(params.get("tail_scale"), cls.__name__)
            obj.calibration_scores_ = cal
            obj.fpr_ = fpr
            obj.threshold_ = math.inf if threshold is None else float(threshold)
        return obj

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit first")

    # -- subclass hooks ------------------------------------------------------------------------------------
    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        raise NotImplementedError

    def _score(self, X: Float32Array) -> FloatArray:
        """Score validated float32 rows; the hot path, so no checks here."""
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def check_tail_scale(value: Any, owner: str) -> float | None:
    """A stored tail scale is null or a positive finite float."""
    if value is None:
        return None
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: tail_scale must be null or a positive number, got {value!r}")
    return value


def require_array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int | None, ...], owner: str) -> np.ndarray:
    """Fetch `arrays[key]` and check its shape (None = any length on that axis) and that it is finite."""
    if key not in arrays:
        raise ValueError(f"{owner}: array {key!r} is missing")
    arr = np.asarray(arrays[key])
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
        raise ValueError(f"{owner}: array {key!r} has shape {arr.shape}, expected {shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{owner}: array {key!r} contains NaN or infinity")
    return arr


def require_param(params: Mapping[str, Any], key: str, kind: type | tuple[type, ...], owner: str) -> Any:
    """Fetch a JSON parameter and check its type (bools are not ints here)."""
    value = params.get(key)
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise ValueError(f"{owner}: parameter {key!r} must be {kind}, got {value!r}")
    return value
