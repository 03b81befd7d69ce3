"""Detection on generated streams: attacks are caught early, benign traffic stays below flag."""

from __future__ import annotations

import numpy as np

from detectors.trackers import SessionTrackers

from .conftest import Digits, first_at, run_stream
from .streams import benign_stream, hsj_like, jbda_stream, natural_patches, uniform_stream

FLAG, BLOCK = 0.5, 0.95


def _jacobian_perturbations(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Jacobian-style synthetic queries: 20 seeds plus lambda * sign(direction), lambda = 10 % of range."""
    seeds = digits.X_held[rng.choice(len(digits.X_held), 20, replace=False)]
    return np.clip(seeds[rng.integers(20, size=n)] + 1.6 * np.sign(rng.normal(size=(n, 64))), 0, 16)


class TestPrada:
    def test_alarms_on_synthetic_stream(self, trackers: SessionTrackers, digits: Digits) -> None:
        """PRADA raises an alarm (W < delta) on most Jacobian-style synthetic streams of 250 queries."""
        alarms = 0
        for s in range(8):
            rows = _jacobian_perturbations(digits, np.random.default_rng(s), 250)
            hist = run_stream(trackers, rows, digits.model)
            alarms += int(hist[-1]["session.prada"] > 0.0)
        assert alarms >= 6

    def test_quiet_on_natural_samples(self, trackers: SessionTrackers, digits: Digits) -> None:
        """PRADA never alarms on held-out natural samples in random order (12 streams of 250)."""
        for s in range(12):
            order = np.random.default_rng(s).permutation(len(digits.X_held))[:250]
            hist = run_stream(trackers, digits.X_held[order], digits.model)
            assert max(h["session.prada"] for h in hist) == 0.0

    def test_one_check_per_request(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A 64-row request of a synthetic stream pools all its rows but runs one Shapiro-Wilk check, not the six
        a stream of single rows would: its checks test one sample, so they are one piece of evidence."""
        rows = _jacobian_perturbations(digits, np.random.default_rng(3), 200)
        single, batched = trackers.new_state(), trackers.new_state()
        for i in range(136):  # past prada_min_pool, as single-row requests
            proba = digits.model.predict_proba(rows[i : i + 1])
            single, _ = trackers.update(single, rows[i : i + 1], None, proba, float(i))
        before = single.s_prada
        batched = single.copy()
        for i in range(136, 200):
            proba = digits.model.predict_proba(rows[i : i + 1])
            single, _ = trackers.update(single, rows[i : i + 1], None, proba, 136.0)
        batched, _ = trackers.update(batched, rows[136:200], None, digits.model.predict_proba(rows[136:200]), 136.0)
        assert batched.n_pool_total == single.n_pool_total  # every row pooled
        one_alarm = float(np.log(0.5 / 0.01))
        assert single.s_prada - before > 2 * one_alarm  # the single rows' checks alarmed several times
        assert batched.s_prada - before <= one_alarm + 1e-9  # the batch's one check, at most one alarm

    def test_silent_before_min_pool(self, trackers: SessionTrackers, digits: Digits) -> None:
        """PRADA cannot speak before prada_min_pool distances are pooled (early detection is others' job)."""
        rows = _jacobian_perturbations(digits, np.random.default_rng(0), trackers.config.prada_min_pool)
        assert all(h["session.prada"] == 0.0 for h in run_stream(trackers, rows, digits.model))


class TestEarlyDetection:
    def test_hsj_like_blocked_within_25(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A HopSkipJump-shaped stream reaches the fingerprint flag within a few dozen queries and the
        risk block level within 25 queries, for 10 different starting images."""
        for s in range(10):
            rng = np.random.default_rng(s)
            rows = hsj_like(digits.X_held[s], rng, 60, hi=16.0, predict=digits.model.predict)
            hist = run_stream(trackers, rows, digits.model)
            assert (first_at(hist, "session.fingerprint", FLAG) or 99) <= 36
            assert (first_at(hist, "session.risk", BLOCK) or 99) <= 25

    def test_uniform_extraction_blocked_within_100(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Uniform-random extraction streams are blocked within 100."""
        for s in range(4):
            rng = np.random.default_rng(s)
            uni = run_stream(trackers, uniform_stream(64, rng, 100, hi=16.0), digits.model, stop_risk=BLOCK)
            assert (first_at(uni, "session.risk", BLOCK) or 999) <= 100

    def test_jbda_extraction_blocked_within_100(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Jacobian-augmentation (JBDA) extraction streams are blocked within 100."""
        for s in range(4):
            rng = np.random.default_rng(s)
            uniform_stream(64, rng, 100, hi=16.0)  # the JBDA seeds drawn after the uniform stream of the same seed
            seeds = digits.X_held[rng.choice(len(digits.X_held), 10, replace=False)]
            jb = run_stream(trackers, jbda_stream(seeds, digits.model.predict, 100, lam=1.6, hi=16.0), digits.model,
                            stop_risk=BLOCK)
            assert (first_at(jb, "session.risk", BLOCK) or 999) <= 100

    def test_natural_out_of_distribution_blocked(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Natural-data extraction with grey photo patches is blocked within 500 queries in >= 9 of 10."""
        caught = 0
        for s in range(10):
            hist = run_stream(trackers, natural_patches(np.random.default_rng(s), 500), digits.model, stop_risk=BLOCK)
            caught += int((first_at(hist, "session.risk", BLOCK) or 999) <= 500)
        assert caught >= 9


class TestBenign:
    def test_benign_sessions_stay_below_flag(self, trackers: SessionTrackers, digits: Digits) -> None:
        """60 benign sessions (shuffled held-out digits, 10 % retries, 5 % noisy near-duplicates, 5 %
        one-pixel shifts, 20-300 queries) all stay below the flag level of session.risk."""
        worst = 0.0
        for s in range(60):
            rng = np.random.default_rng(1000 + s)
            rows = benign_stream(digits.X_held, rng, int(rng.integers(20, 300)), image_shape=(8, 8), hi=16.0)
            hist = run_stream(trackers, rows, digits.model)
            worst = max(worst, max(h["session.risk"] for h in hist))
        assert worst < FLAG
