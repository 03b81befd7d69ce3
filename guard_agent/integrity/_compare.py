"""Comparing a model's answers with the recorded ones: labels exactly, probabilities within a tolerance.

Pure: the checker and ``guard-agent canary check`` both call it, and tests table it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard_agent.integrity._canaries import CanarySet

__all__ = ["CanaryDiff", "CanaryResult", "compare_answers", "metadata_changes"]

MAX_LISTED = 20
"""Differing canaries named in one event; the counts cover all of them."""


@dataclass(frozen=True)
class CanaryDiff:
    """One canary the model answered differently."""

    index: int
    kind: str
    expected_label: int | None
    got_label: int | None
    probability_diff: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "expected_label": self.expected_label,
                "got_label": self.got_label,
                "probability_diff": None if self.probability_diff is None else round(self.probability_diff, 6)}


@dataclass(frozen=True)
class CanaryResult:
    """The outcome of replaying one canary set."""

    revision: str
    checked: int
    differed: int
    label_mismatches: int
    max_probability_diff: float
    diffs: tuple[CanaryDiff, ...] = ()
    reason: str | None = None
    metadata_changed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.differed == 0 and self.reason is None and not self.metadata_changed

    def as_dict(self) -> dict[str, Any]:
        """The event's view: counts, the first few differing canaries, what changed."""
        out: dict[str, Any] = {
            "revision": self.revision, "checked": self.checked, "differed": self.differed,
            "label_mismatches": self.label_mismatches,
            "max_probability_diff": round(self.max_probability_diff, 6),
            "differed_canaries": [d.as_dict() for d in self.diffs[:MAX_LISTED]],
        }
        if self.reason:
            out["reason"] = self.reason
        if self.metadata_changed:
            out["metadata_changed"] = list(self.metadata_changed)
        return out


def _all_failed(cs: CanarySet, reason: str) -> CanaryResult:
    diffs = tuple(CanaryDiff(i, cs.kinds[i], _label(cs.labels, i), None, None) for i in range(cs.count))
    return CanaryResult(cs.revision, cs.count, cs.count, cs.count if cs.labels is not None else 0,
                        float("inf"), diffs, reason)


def _label(labels: np.ndarray | None, i: int) -> int | None:
    return None if labels is None else int(labels[i])


def compare_answers(cs: CanarySet, labels: np.ndarray | None, probabilities: np.ndarray | None) -> CanaryResult:
    """Which canaries differ from the recorded answers, and by how much."""
    n = cs.count
    if cs.labels is not None and (labels is None or labels.shape != (n,)):
        return _all_failed(cs, "the answer has no labels in the recorded shape")
    if cs.probabilities is not None and (probabilities is None or probabilities.shape != cs.probabilities.shape):
        got = None if probabilities is None else list(probabilities.shape)
        return _all_failed(cs, f"probabilities shaped {got}, recorded {list(cs.probabilities.shape)}")
    label_bad: np.ndarray = np.zeros(n, dtype=bool) if cs.labels is None else np.asarray(labels != cs.labels)
    if cs.probabilities is not None and probabilities is not None:
        prob_diff = np.max(np.abs(probabilities - cs.probabilities), axis=1)
        prob_diff = np.where(np.isfinite(prob_diff), prob_diff, np.inf)
        prob_bad = prob_diff > cs.probability_atol
    else:
        prob_diff = np.zeros(n)
        prob_bad = np.zeros(n, dtype=bool)
    bad = np.flatnonzero(label_bad | prob_bad)
    order = bad[np.argsort(-prob_diff[bad], kind="stable")]  # the largest differences first
    diffs = tuple(
        CanaryDiff(int(i), cs.kinds[i], _label(cs.labels, int(i)), _label(labels, int(i)),
                   float(prob_diff[i]) if cs.probabilities is not None else None)
        for i in order
    )
    return CanaryResult(cs.revision, n, int(bad.size), int(label_bad.sum()),
                        float(prob_diff.max()) if n else 0.0, diffs)


def metadata_changes(recorded: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Top-level metadata fields whose values differ (a field present on one side only counts)."""
    if recorded is None:
        return ()
    if current is None:
        return ("<unavailable>",)
    keys = set(recorded) | set(current)
    return tuple(sorted(k for k in keys if recorded.get(k) != current.get(k)))
