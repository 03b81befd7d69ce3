"""Threshold suggestions for a target FPR and the comment-preserving policy rewrite."""

from __future__ import annotations

import numpy as np
import pytest

from guard_agent.policy import parse_policy
from guard_agent.policy.store import default_policy_text
from guard_agent.tuning import retune_policy_text, suggest


class TestSuggest:
    @pytest.mark.parametrize("fpr", [0.1, 0.01, 0.001])
    def test_holds_on_fresh_benign_data(self, fpr: float) -> None:
        """A threshold from one benign sample keeps the FPR near the target on another sample of the same traffic."""
        rng = np.random.default_rng(int(1 / fpr))
        fit, fresh = rng.beta(2, 5, size=20_000), rng.beta(2, 5, size=200_000)
        s = suggest("ood.knn", fit, fpr)
        assert s.resolvable and s.trustworthy and s.threshold is not None
        assert s.benign_fpr <= fpr
        measured = float(np.mean(fresh >= s.threshold))
        assert measured <= fpr * 1.5 + 3 / fresh.size  # conformal bound plus sampling noise
        assert measured >= fpr * 0.5

    def test_too_little_data_is_reported(self) -> None:
        """With n benign scores a target below 1/(n+1) is not resolvable; the threshold sits above the maximum."""
        benign = np.linspace(0.1, 0.6, 99)
        s = suggest("ood.knn", benign, 0.001)
        assert not s.resolvable and not s.trustworthy
        assert s.threshold is not None and s.threshold > benign.max() and s.benign_fpr == 0.0

    def test_constant_benign_scores_are_degenerate(self) -> None:
        """A tracker that stays at 0 on benign traffic gives no tail to place a threshold in."""
        s = suggest("session.prada", np.zeros(5000), 0.01)
        assert s.degenerate and not s.trustworthy

    def test_unreachable_when_benign_saturates(self) -> None:
        """When more than the target fraction of benign requests score 1.0, no threshold in [0, 1] works."""
        benign = np.r_[np.full(50, 1.0), np.linspace(0, 0.9, 950)]
        s = suggest("ood.combined", benign, 0.01)
        assert s.threshold is None and s.benign_fpr == pytest.approx(0.05)

    def test_ties_never_exceed_the_target(self) -> None:
        """Quantised scores (calibration steps) with ties still meet the target on the data they came from."""
        rng = np.random.default_rng(3)
        benign = np.round(rng.uniform(size=10_000), 2)
        for fpr in (0.05, 0.02, 0.006):  # about 0.5% of the values round to 1.0
            s = suggest("ood.pca", benign, fpr)
            assert s.threshold is not None and float(np.mean(benign >= s.threshold)) <= fpr


class TestRetunePolicy:
    def test_rewrites_numbers_only_and_validates(self) -> None:
        """Only the threshold numbers change: comments and layout stay, and the result validates."""
        text = default_policy_text()
        new, edits = retune_policy_text(text, lambda _m, _s, fpr, _old: round(0.9 + 0.001 / fpr * 0.001, 6),
                                        target_fpr=0.01)
        assert parse_policy(new).policy.default.rules
        old_lines, new_lines = text.splitlines(), new.splitlines()
        assert len(old_lines) == len(new_lines)
        changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
        assert changed and all(a.split(":")[0] == b.split(":")[0] for a, b in changed)
        assert sum(1 for line in new_lines if line.lstrip().startswith("#")) == \
            sum(1 for line in old_lines if line.lstrip().startswith("#"))
        assert {e.score for e in edits} >= {"ood.combined", "session.risk"}
        assert all(e.score != "input.schema" for e in edits)  # a hard check, not a distribution

    def test_stricter_tiers_get_rarer_targets(self) -> None:
        """Flag, harden and block get the target FPR, /10 and /100, also when a block is a score's only rule."""
        text = default_policy_text()
        seen: dict[str, float] = {}

        def threshold_for(_m: str | None, score: str, fpr: float, _old: float) -> float:
            return 1 - fpr  # any decreasing map of the FPR

        _, edits = retune_policy_text(text, threshold_for, target_fpr=0.01)
        for e in edits:
            if e.score == "session.risk":
                seen[e.action] = e.target_fpr
        assert seen == {"flag": 0.01, "harden": 0.001, "block": 0.0001}
        alone = {e.rule: e.target_fpr for e in edits if e.score == "session.prada"}
        assert alone == {"model-extraction": 0.0001}

    def test_none_keeps_the_rule(self) -> None:
        """A score without a usable suggestion keeps its threshold."""
        text = default_policy_text()
        new, edits = retune_policy_text(text, lambda *_: None, target_fpr=0.01)
        assert new == text and all(e.new is None for e in edits)
