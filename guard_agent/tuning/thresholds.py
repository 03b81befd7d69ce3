"""Thresholds for a target false-positive rate, from the scores of captured benign traffic.

The threshold for a score is the smallest value that, on exchangeable new
benign traffic, fires on at most the target fraction of requests: with ``n``
benign scores the ``k``-th largest is exceeded by a new benign score with
probability ``k / (n + 1)``, so the threshold sits just above the
``k = floor(fpr * (n + 1))``-th largest benign score (the split-conformal
bound). When ``n`` is too small for the target (``fpr * (n + 1) < 1``) the
threshold goes just above the largest benign score and the suggestion says the
target is not resolvable on this much traffic. When the benign scores at that
quantile all sit at their minimum (a tracker that stays at 0 on benign
sessions) the data say nothing about where the benign tail starts: the
suggestion is marked degenerate. Policy rewriting lowers a threshold only on a
trustworthy suggestion (resolvable, not degenerate); otherwise it only raises
thresholds that benign traffic would cross.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from guard_agent.policy.model import SCORE_NAMES
from guard_agent.tuning.records import CapturedDecision

__all__ = ["UNTUNED_SCORES", "Suggestion", "TradeOff", "scores_by_name", "suggest", "trade_off"]

UNTUNED_SCORES = frozenset({"input.schema", "integrity.canary"})
"""Hard checks (1.0 = broken), not distributions: no threshold to tune."""

_STEP = 1e-6  # captured scores carry 6 decimals


@dataclass(frozen=True)
class Suggestion:
    score: str
    target_fpr: float
    threshold: float | None   # None: no threshold on [0, 1] reaches the target (too many benign 1.0s)
    benign_n: int
    benign_fpr: float         # measured on the captured benign traffic at this threshold
    resolvable: bool          # enough benign traffic for the target (fpr * (n + 1) >= 1)
    degenerate: bool = False  # the benign values at this quantile all equal the minimum (no tail to place it in)

    @property
    def trustworthy(self) -> bool:
        """Safe to lower a threshold to: enough data and an actual tail in it."""
        return self.threshold is not None and self.resolvable and not self.degenerate


@dataclass(frozen=True)
class TradeOff:
    suggestion: Suggestion
    benign_sessions: float            # fraction of benign sessions with at least one request at or above
    attack_tpr: float | None          # fraction of attack-session requests at or above the threshold
    attack_sessions: float | None     # fraction of attack sessions with at least one such request


def scores_by_name(decisions: Iterable[CapturedDecision]) -> dict[str, np.ndarray]:
    """Per score, every captured value (requests that lack a score contribute nothing to it)."""
    acc: dict[str, list[float]] = {}
    for d in decisions:
        for name, value in d.scores.items():
            if name in SCORE_NAMES and name not in UNTUNED_SCORES and math.isfinite(value):
                acc.setdefault(name, []).append(value)
    return {name: np.asarray(values, dtype=np.float64) for name, values in acc.items()}


def _ceil6(x: float) -> float:
    return math.ceil(round(x * 1e6, 3)) / 1e6


def suggest(name: str, benign: np.ndarray, target_fpr: float) -> Suggestion:
    """The threshold (for ``gte``) meeting ``target_fpr`` on benign traffic like ``benign``."""
    n = int(benign.size)
    if n == 0:
        return Suggestion(name, target_fpr, None, 0, float("nan"), False)
    k = math.floor(target_fpr * (n + 1))
    resolvable = k >= 1
    ordered = np.sort(benign)[::-1]
    pivot = float(ordered[min(max(k, 1), n) - 1]) if k >= 1 else float(ordered[0])
    # k >= 1: up to k - 1 benign scores may lie at or above the threshold; just above the k-th largest.
    threshold = _ceil6(pivot + _STEP)
    degenerate = pivot <= float(ordered[-1])
    if threshold > 1.0:
        return Suggestion(name, target_fpr, None, n, float(np.mean(benign >= 1.0)), resolvable, degenerate)
    return Suggestion(name, target_fpr, threshold, n, float(np.mean(benign >= threshold)), resolvable, degenerate)


def _session_hits(decisions: list[CapturedDecision], name: str, threshold: float | None) -> float | None:
    """Fraction of the sessions (that have this score) with at least one request at or above ``threshold``."""
    hits: dict[str, bool] = {}
    for d in decisions:
        if name in d.scores:
            hits[d.session] = hits.get(d.session, False) or (threshold is not None and d.scores[name] >= threshold)
    return float(np.mean(list(hits.values()))) if hits else None


def trade_off(benign: Iterable[CapturedDecision], attack: Iterable[CapturedDecision] | None,
              fprs: Iterable[float]) -> dict[str, list[TradeOff]]:
    """For each score and FPR: the threshold, how many benign sessions it touches, and (with labelled attacks)
    what it catches."""
    benign_list = list(benign)
    attack_list = list(attack) if attack is not None else None
    values = scores_by_name(benign_list)
    out: dict[str, list[TradeOff]] = {}
    for name in sorted(values):
        rows: list[TradeOff] = []
        for fpr in sorted(set(fprs), reverse=True):
            s = suggest(name, values[name], fpr)
            tpr: float | None = None
            sessions: float | None = None
            if attack_list:
                scored = [d.scores[name] for d in attack_list if name in d.scores]
                if scored:
                    tpr = float(np.mean([v >= s.threshold for v in scored])) if s.threshold is not None else 0.0
                    sessions = _session_hits(attack_list, name, s.threshold)
            rows.append(TradeOff(s, _session_hits(benign_list, name, s.threshold) or 0.0, tpr, sessions))
        out[name] = rows
    return out
