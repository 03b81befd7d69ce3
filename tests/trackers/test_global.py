"""GlobalFingerprintIndex: catches one attack spread over many sessions, ignores benign traffic, stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.trackers import GlobalFingerprintIndex, SessionTrackers

from .conftest import Digits
from .streams import hsj_like


class TestGlobalIndex:
    def test_attack_spread_over_10_sessions(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A HopSkipJump-shaped stream sent round-robin from 10 session ids crosses 0.5 within 60 queries,
        while no single session sees more than 6 of those queries."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        rows = hsj_like(digits.X_held[3], np.random.default_rng(3), 60, hi=16.0)
        fps = trackers.fingerprints(rows)
        scores = [index.observe(f"attacker-{i % 10}", fps[i : i + 1], float(i)) for i in range(len(rows))]
        assert max(scores) >= 0.5
        assert min(scores) >= 0.0 and max(scores) <= 1.0

    def test_benign_sessions_do_not_match(self, trackers: SessionTrackers, digits: Digits) -> None:
        """300 distinct held-out images from 10 sessions and exact repeats across sessions score < 0.5."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        fps = trackers.fingerprints(digits.X_held[:300])
        scores = [index.observe(f"user-{i % 10}", fps[i : i + 1], float(i)) for i in range(300)]
        scores += [index.observe(f"other-{i}", fps[:1], 400.0 + i) for i in range(20)]
        assert max(scores) < 0.5

    def test_own_session_and_old_entries_do_not_count(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Near-duplicates from the same session, or older than the window, do not raise the global score."""
        index = GlobalFingerprintIndex(max_entries=1000, window_s=100.0)
        rows = hsj_like(digits.X_held[5], np.random.default_rng(5), 60, hi=16.0)
        fps = trackers.fingerprints(rows)
        assert max(index.observe("one", fps[i : i + 1], float(i)) for i in range(40)) == 0.0
        assert index.observe("late", fps[40:41], 1000.0) == 0.0
        assert index.observe("fresh", fps[41:42], 1001.0) > 0.0

    def test_bounded_entries(self, trackers: SessionTrackers) -> None:
        """The index never holds more than max_entries fingerprints."""
        index = GlobalFingerprintIndex(max_entries=50)
        fps = trackers.fingerprints(np.random.default_rng(0).uniform(0, 16, size=(200, 64)))
        for i in range(200):
            index.observe("s", fps[i : i + 1], float(i))
        assert len(index) == 50

    def test_rejects_bad_parameters_and_widths(self, trackers: SessionTrackers) -> None:
        """Invalid parameters and a fingerprint width change raise ValueError."""
        with pytest.raises(ValueError, match="invalid"):
            GlobalFingerprintIndex(max_entries=0)
        with pytest.raises(ValueError, match="invalid"):
            GlobalFingerprintIndex(match_threshold=1.5)
        index = GlobalFingerprintIndex(max_entries=10)
        index.observe("s", np.ones((1, 20), dtype=np.uint64), 0.0)
        with pytest.raises(ValueError, match="width"):
            index.observe("s", np.ones((1, 8), dtype=np.uint64), 1.0)

    def test_global_score_feeds_risk(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Passing global_fingerprint >= 0.5 to update raises session.risk without other evidence."""
        state = trackers.new_state()
        x = digits.X_held[:1]
        for t in range(12):
            state, scores = trackers.update(state, x, None, None, float(t), global_fingerprint=0.9)
        assert scores["session.risk"] >= 0.5
        assert scores["session.fingerprint"] == 0.0
