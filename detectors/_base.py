"""The shape every stateless detector shares: fit, score (higher = more anomalous), threshold, p-values,
state."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
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
# 1.0, which therefore means "beyond every calibration row by far more than even a heavy fitted tail expects".
P_FLOOR = 1e-300
MIN_TAIL_ROWS = 20  # fewer calibration scores: no tail is fitted
MIN_EXCEEDANCES = 10  # fewer positive excesses over the tail's base: no tail is fitted
SHAPE_MARGIN = 2.0  # the fitted shape is raised by this many standard errors


@dataclass(frozen=True)
class Tail:
    """Generalised Pareto tail fitted over `base`: P(score > s) = exceedances / (n + 1) * (1 + shape * z)^(-1/shape),
    z = (s - base) / scale (shape 0: exp(-z)). Used beyond the largest calibration score (see
    `conformal_p_values`, which also anchors it at that score). Shape >= 0 always: never a bounded tail."""

    base: float
    scale: float
    shape: float = 0.0
    exceedances: int = 1


def gpd_fit(excesses: FloatArray) -> tuple[float, float]:
    """(shape, scale) of a generalised Pareto distribution fitted to positive excesses (Zhang & Stephens 2009).

    The estimator averages the profile likelihood over a grid instead of maximising it, so it stays stable with
    a few dozen exceedances, where maximum likelihood is erratic; a positive shape is a heavy (polynomial) tail.
    """
    y = np.sort(np.asarray(excesses, dtype=np.float64))
    n = y.size
    grid = 30 + int(math.sqrt(n))
    theta = 1.0 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))
    theta /= 3.0 * y[max(int(n / 4 + 0.5) - 1, 0)]
    theta += 1.0 / y[-1]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # exp overflow = negligible weight
        k = np.log1p(-theta[:, None] * y).mean(axis=1)
        log_lik = n * (np.log(-theta / k) - k - 1.0)
        weights = 1.0 / np.exp(log_lik - log_lik[:, None]).sum(axis=1)
    theta_hat = float(np.sum(theta * weights / weights.sum()))
    shape = float(np.log1p(-theta_hat * y).mean())
    return shape, -shape / theta_hat


def fit_tail(sorted_cal: FloatArray, *, min_scale: float = 0.0, exponential: bool = False) -> Tail | None:
    """Tail for p-values beyond the largest calibration score, fitted to the top max(10, 10%) scores, or None.

    Peaks over threshold: the excesses over the base (the score just below the top m) get a generalised Pareto
    fit (`gpd_fit`). Conservative, because a p-value must not promise more than the data support: the fitted
    shape is taken at 0 or more, then raised by two standard errors ((1 + shape) / sqrt(m) each), so the tail
    is always polynomial, the more so the fewer the exceedances (m = 10: shape >= 0.63; m = 100: >= 0.2), and
    the scale is at least the mean excess; heavy
    top scores (e.g. distances dominated by a near-constant feature) get a polynomial tail; `conformal_p_values`
    then takes the heavier of this tail anchored at the base (rate m / (n + 1), estimated from all m scores)
    and at the largest score (rate 1 / (n + 1)). On fresh scores (lognormal, Student-t 2 and 3, Pareto,
    chi-square, exponential, Weibull; 300 and 1,000 calibration scores) this keeps P(p <= 1e-4) and
    P(p <= 1e-5) at or below their nominal values, where the plain exponential tail fired up to 40x too often
    (one standard error was not enough: Student-t 2 fired 8x too often at 1e-5). The scale is at least
    `min_scale`. `exponential=True` fits shape 0 (scale = the mean excess, at least `min_scale`): for scores
    whose growth is a count of independent-ish events (features out of range, see `SchemaRange`).
    None (no tail) with fewer than 20 scores or 10 positive excesses, unless `min_scale` > 0: then an
    exponential tail of that scale from the largest score.
    """
    n = sorted_cal.shape[0]
    fallback = Tail(float(sorted_cal[-1]), float(min_scale)) if min_scale > 0 and n > 0 else None
    if n < MIN_TAIL_ROWS:
        return fallback
    m = min(n - 1, max(10, math.ceil(0.1 * n)))
    base = float(sorted_cal[n - m - 1])
    y = np.asarray(sorted_cal[n - m :], dtype=np.float64) - base
    y = y[y > 0]
    if y.size < MIN_EXCEEDANCES or not np.isfinite(y).all() or np.unique(y).size < 3:
        return fallback
    if exponential:
        if base <= float(sorted_cal[0]) and y.size > 1:
            # the window starts in an atom at the minimum (e.g. the 0 of every in-range row): the excess over it
            # would count the jump out of the atom as tail; start at the smallest score above it instead
            base, y = base + float(y[0]), y[1:] - y[0]
        return Tail(base, max(float(np.mean(y)), float(min_scale)), 0.0, int(y.size))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        shape, scale = gpd_fit(y)
    if not (math.isfinite(shape) and math.isfinite(scale) and scale > 0):
        shape, scale = 0.0, float(np.mean(y))
    # a light or bounded fit (shape < 0) counts as exponential before the margin: the top max(10, 10%) scores of
    # a small reference cannot show a heavy tail it has not sampled (breast_cancer, 100 rows: the fit of the
    # top 10 Mahalanobis scores was bounded, the margin left it exponential, and held-out benign rows 13x the
    # calibration maximum got p < 1e-7)
    shape = max(shape, 0.0)
    scale = max(scale, float(np.mean(y)))
    shape += SHAPE_MARGIN * (1.0 + shape) / math.sqrt(y.size)
    if not (math.isfinite(scale) and scale > 0):
        return fallback
    return Tail(base, max(scale, float(min_scale)), shape, int(y.size))


def conformal_p_values(sorted_cal: FloatArray, scores: npt.ArrayLike, tail: Tail | None = None) -> FloatArray:
    """p = (1 + #{calibration >= s}) / (n + 1): a valid p-value for an exchangeable new score, never 0.

    Beyond the largest calibration score the `tail` (see `fit_tail`) continues the decay, at most 1 / (n + 1).
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
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            # anchored at the base (rate exceedances / (n + 1)) and at the top (rate 1 / (n + 1), conditional
            # scale there); the heavier of the two, never above the empirical 1 / (n + 1)
            from_base = tail.exceedances * _survival(s - tail.base, tail.scale, tail.shape)
            from_top = _survival(s - top, tail.scale + tail.shape * max(top - tail.base, 0.0), tail.shape)
            p_tail = np.minimum(np.maximum(from_base, from_top), 1.0) / (n + 1.0)
        p = np.where(beyond, np.nan_to_num(p_tail, nan=0.0), p)
        np.maximum(p, P_FLOOR, out=p)
    return p


def _survival(excess: FloatArray, scale: float, shape: float) -> FloatArray:
    """Generalised Pareto survival function (shape 0: exponential) of non-negative excesses."""
    z = np.maximum(excess, 0.0) / scale
    log_s = -z if shape == 0.0 else -np.log1p(shape * z) / shape
    return np.asarray(np.exp(log_s), dtype=np.float64)


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
    # p-values beyond the calibration maximum come from a tail fitted to the top calibration scores (`fit_tail`);
    # a positive floor makes it at least that heavy (raw-score units) and gives a tail when none can be fitted
    min_tail_scale: ClassVar[float] = 0.0
    # True: the tail is exponential (shape 0), not a generalised Pareto with a raised shape (see `fit_tail`)
    exponential_tail: ClassVar[bool] = False
    n_features_in_: int
    calibration_scores_: FloatArray
    threshold_: float
    fpr_: float
    tail_: Tail | None

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
        return self.calibrate(self.score_samples(X_val), fpr)

    def calibrate(self, scores: npt.ArrayLike, fpr: float) -> float:
        """Keep given in-distribution scores of rows this detector's fit never saw (e.g. the out-of-fold scores
        of a cross-conformal fit, see `fit_profile`) for p-values; return the threshold at the target FPR."""
        cal = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
        if cal.size == 0 or not np.isfinite(cal).all():
            raise ValueError("calibration scores must be a non-empty vector of finite numbers")
        self.calibration_scores_ = cal
        self.fpr_ = float(fpr)
        self.threshold_ = conformal_threshold(self.calibration_scores_, fpr)
        self.tail_ = fit_tail(
            self.calibration_scores_, min_scale=self.min_tail_scale, exponential=self.exponential_tail
        )
        return self.threshold_

    def p_values(self, scores: npt.ArrayLike) -> FloatArray:
        """Conformal p-values of raw scores against the stored calibration scores (small = anomalous)."""
        if not hasattr(self, "calibration_scores_"):
            raise NotFittedError(f"{type(self).__name__}: call infer_threshold before p_values")
        return conformal_p_values(self.calibration_scores_, scores, self.tail_)

    # -- persistence -------------------------------------------------------------------------------------
    def get_state(self) -> State:
        """JSON-able parameters and named arrays that fully describe the fitted detector (no pickle)."""
        self._check_fitted()
        params = {"n_features": self.n_features_in_, **self._params()}
        arrays = dict(self._arrays())
        if hasattr(self, "calibration_scores_"):
            params["fpr"] = self.fpr_
            params["threshold"] = None if math.isinf(self.threshold_) else self.threshold_
            params["tail"] = None if self.tail_ is None else dataclasses.asdict(self.tail_)
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
            obj.tail_ = check_tail(params.get("tail"), cls.__name__)
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


def check_tail(value: Any, owner: str) -> Tail | None:
    """A stored tail is null or {base, scale > 0, shape >= 0, exceedances >= 1}, all finite."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"base", "scale", "shape", "exceedances"}:
        raise ValueError(f"{owner}: tail must be null or an object with base, scale, shape, exceedances")
    base, scale, shape, count = value["base"], value["scale"], value["shape"], value["exceedances"]
    if not all(isinstance(v, float) and math.isfinite(v) for v in (base, scale, shape)) or scale <= 0 or shape < 0:
        raise ValueError(f"{owner}: tail needs a finite base, scale > 0 and shape >= 0, got {value!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{owner}: tail exceedances must be a positive integer, got {count!r}")
    return Tail(base, scale, shape, count)


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
