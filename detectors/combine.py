"""Merge per-detector p-values into one calibrated score, so one threshold controls the whole set's FPR."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ._base import P_FLOOR
from ._validation import FloatArray

METHODS = ("fisher", "min")


def combine_statistic(p_matrix: npt.ArrayLike, method: str) -> FloatArray:
    """Per-row statistic, higher = more anomalous: Fisher's -2 sum(log p) or Bonferroni-style -log(min p).

    Detectors are strongly correlated, so neither statistic follows its textbook null distribution here; the
    combiner therefore calibrates the statistic empirically (see `PValueCombiner`).
    """
    p = np.asarray(p_matrix, dtype=np.float64)
    if method == "fisher":
        return np.asarray(-2.0 * np.log(p).sum(axis=1), dtype=np.float64)
    if method == "min":
        return np.asarray(-np.log(p.min(axis=1)), dtype=np.float64)
    raise ValueError(f"unknown combine method {method!r}; expected one of {METHODS}")


def merged_p_values(p_matrix: npt.ArrayLike, method: str) -> FloatArray:
    """A p-value valid under any dependence between the detectors (Vovk & Wang 2020, "Combining p-values via
    averaging"): Bonferroni k * min(p) for "min", e * geometric mean for "fisher". Capped at 1."""
    p = np.asarray(p_matrix, dtype=np.float64)
    k = p.shape[1]
    if method == "min":
        merged = k * p.min(axis=1)
    elif method == "fisher":
        merged = math.e * np.exp(np.log(p).mean(axis=1))
    else:
        raise ValueError(f"unknown combine method {method!r}; expected one of {METHODS}")
    return np.asarray(np.minimum(merged, 1.0), dtype=np.float64)


class PValueCombiner:
    """Empirically calibrated p-value combination.

    `fit` takes the leave-one-out p-values of the calibration rows (one column per detector) and stores the
    sorted combined statistics; `p_values` turns a new row's statistic into a conformal p-value against them.
    Default "min" (Bonferroni-style: the smallest p-value, re-calibrated rather than multiplied by the number
    of detectors) fires whenever one detector is sure; "fisher" pools moderate evidence from several. On the
    detection benchmark "min" caught as much or more at the same FPR (e.g. FGSM eps=1 on digits: 0.82 vs 0.56
    TPR at 1% FPR): weak detectors dilute Fisher's sum, they cannot dilute a minimum.

    At and beyond the largest calibration statistic no empirical rank is left. There the p-value is the
    smaller of the full-conformal p-value at the top and the dependence-free merged p-value
    (`merged_p_values`); no tail is fitted to the statistic, so the combination is exactly as trustworthy as
    the detectors' own tails. The top: a leave-one-out p-value is at least 1/n, so the calibration row holding
    each detector's maximum sits at the top of the statistic. A new row past some detectors' maxima (p = 1/(n+1)
    there) ties with the top rows of the detectors it did not pass, as it would if all n + 1 rows were ranked
    together: p = (1 + #those rows) / (n + 1) for "min" (all top rows for "fisher"). Ranking it alone at
    1/(n + 1) would make the combination fire at up to k times its nominal rate there.
    """

    calibration_scores_: FloatArray
    top_rows_: npt.NDArray[np.int64]

    def __init__(self, *, method: str = "min") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown combine method {method!r}; expected one of {METHODS}")
        self.method = method

    def fit(self, cal_p_matrix: npt.ArrayLike) -> PValueCombiner:
        """Store the calibration distribution of the combined statistic and, per detector, the calibration row
        holding its maximum (-1 when several rows share it)."""
        P = np.asarray(cal_p_matrix, dtype=np.float64)
        self.calibration_scores_ = np.sort(combine_statistic(P, self.method))
        self.top_rows_ = top_rows(P)
        return self

    def p_values(self, p_matrix: npt.ArrayLike) -> FloatArray:
        """Conformal p-value of each row's combined statistic; the merged p-value at and beyond the top."""
        P = np.asarray(p_matrix, dtype=np.float64)
        stat = combine_statistic(P, self.method)
        cal = self.calibration_scores_
        n = cal.shape[0]
        top = float(cal[-1])
        p = (1.0 + (n - np.searchsorted(cal, stat, side="left"))) / (n + 1.0)
        at_top = stat >= top
        if at_top.any():
            n_top = n - np.searchsorted(cal, top, side="left")
            ties = np.full(P.shape[0], float(n_top))
            # past that detector's calibration maximum (in range p >= 2/(n + 1))
            passed = np.less_equal(P, 1.5 / (n + 1.0))
            if self.method == "min" and self.top_rows_.shape == (P.shape[1],):
                ties = np.where(passed.any(axis=1), _unpassed_top_rows(self.top_rows_, passed), ties)
            p_top = (1.0 + ties) / (n + 1.0)
            p = np.where(at_top, np.minimum(p_top, merged_p_values(P, self.method)), p)
        return np.asarray(np.maximum(p, P_FLOOR), dtype=np.float64)


def top_rows(loo_p_matrix: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Per detector, the index of the one calibration row with the smallest leave-one-out p-value (its maximum
    score), or -1 when several rows share it (then none of them ranks alone at the top)."""
    P = np.asarray(loo_p_matrix, dtype=np.float64)
    low = P.min(axis=0)
    at_min = np.equal(P, low)
    unique = at_min.sum(axis=0) == 1
    return np.where(unique, np.argmax(at_min, axis=0), -1).astype(np.int64)


def _unpassed_top_rows(rows: npt.NDArray[np.int64], passed: npt.NDArray[np.bool_]) -> FloatArray:
    """Per new row: how many distinct calibration rows still hold the maximum of a detector it did not pass."""
    held = np.sort(np.where(~passed & (rows >= 0), rows, -1), axis=1)
    first = np.concatenate([np.full((held.shape[0], 1), -1), held[:, :-1]], axis=1)
    return np.asarray(((held >= 0) & (held != first)).sum(axis=1), dtype=np.float64)
