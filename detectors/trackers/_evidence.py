"""Sequential evidence: log-likelihood ratios, CUSUM accumulation, decay and the [0, 1] score scale.

Every session score is a CUSUM statistic ``S`` (nats of evidence that the session is an attack rather
than benign traffic) mapped to ``1 - 2 ** (-(S / S_HALF) ** 2)``. ``S_HALF = ln(1e6)``: for a CUSUM whose
per-query log-likelihood ratios are right under the benign model, the probability that a benign session
of up to 1,000 queries ever reaches ``S_HALF`` is at most ``1000 * exp(-S_HALF) = 0.1 %``. Re-testing
after every query is part of that bound, which is why thresholds do not inflate with session length.

Landmarks: score 0.5 = S_HALF (13.8 nats, bound 1e-3), 0.8 = 1.52 S_HALF (21 nats, bound 7e-7),
0.95 = 2.08 S_HALF (28.7 nats, bound 3e-10). The square keeps weak benign evidence near 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Evidence (nats) that maps to a score of 0.5.
S_HALF: float = math.log(1e6)
#: Per-query evidence is clipped to this range so that one odd query can neither prove nor erase much.
LLR_MIN: float = -3.0
LLR_MAX: float = 6.0


def bernoulli_llr(p0: float, p1: float) -> tuple[float, float]:
    """Return (llr if the event happens, llr if it does not) for benign rate p0 vs attack rate p1."""
    p0 = min(max(p0, 1e-6), 1.0 - 1e-6)
    p1 = min(max(p1, 1e-6), 1.0 - 1e-6)
    hit = math.log(p1 / p0)
    miss = math.log((1.0 - p1) / (1.0 - p0))
    return (min(max(hit, LLR_MIN), LLR_MAX), min(max(miss, LLR_MIN), LLR_MAX))


def cusum(s: float, llr: float) -> float:
    """One CUSUM step: evidence accumulates and never drops below zero."""
    return max(0.0, s + min(max(llr, LLR_MIN), LLR_MAX))


def decay_factor(dt: float, half_life: float) -> float:
    """Multiplicative decay after ``dt`` seconds (no decay for dt <= 0 or an infinite half-life)."""
    if dt <= 0.0 or not math.isfinite(half_life) or half_life <= 0.0:
        return 1.0
    return float(2.0 ** (-dt / half_life))


def to_score(s: float | np.floating[Any]) -> float:
    """Map evidence in nats to the documented [0, 1) score scale."""
    v = float(s)
    if not math.isfinite(v) or v <= 0.0:
        return 0.0
    if v >= 40.0 * S_HALF:  # 1 - 2**-1600 is 1.0 in floating point; avoid overflow on huge evidence
        return 1.0
    return float(-math.expm1(-math.log(2.0) * (v / S_HALF) ** 2))


def from_score(score: float) -> float:
    """Inverse of :func:`to_score` (evidence in nats for a score), for thresholds in tests and docs."""
    if score <= 0.0:
        return 0.0
    if score >= 1.0:
        return math.inf
    return S_HALF * math.sqrt(-math.log1p(-score) / math.log(2.0))
