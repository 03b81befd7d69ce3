"""Scores: names, ranges, time decay, batch semantics and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from detectors.trackers import SCORE_NAMES, SessionTrackers, from_score, to_score

from .conftest import Digits, run_stream
from .streams import uniform_stream

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class TestScoreScale:
    def test_names_match_the_policy_vocabulary(self, trackers: SessionTrackers) -> None:
        """The trackers report exactly the documented score names."""
        expected = {"session.prada", "session.fingerprint", "session.neighbors", "session.coverage",
                    "session.margin", "session.rate", "session.risk", "session.crawl"}
        assert trackers.score_names == SCORE_NAMES == expected
        assert set(trackers.peek(trackers.new_state(), 0.0)) == expected

    @given(s=st.floats(0, 1e6))
    def test_mapping_is_monotone_and_invertible(self, s: float) -> None:
        """to_score maps evidence into [0, 1], from_score inverts it, landmarks are as documented."""
        v = to_score(s)
        assert 0.0 <= v <= 1.0
        if 0.0 < v < 1.0:
            # near 1.0 the float spacing of v (1e-16) limits how exactly it can be inverted
            assert from_score(v) == pytest.approx(s, rel=1e-6 if v < 1.0 - 1e-9 else 1e-3)
        assert to_score(from_score(0.5)) == pytest.approx(0.5)
        assert from_score(0.95) == pytest.approx(2.08 * from_score(0.5), rel=0.01)

    @_SETTINGS
    @given(
        X=arrays(np.float64, st.tuples(st.integers(1, 6), st.just(64)),
                 elements=st.floats(-1e12, 1e12, allow_nan=False)),
        proba_seed=st.integers(0, 1000),
        with_proba=st.booleans(),
    )
    def test_scores_stay_in_range(self, trackers: SessionTrackers, X: np.ndarray, proba_seed: int,
                                  with_proba: bool) -> None:
        """Any finite input, with or without probabilities, gives finite scores in [0, 1]."""
        rng = np.random.default_rng(proba_seed)
        proba = rng.dirichlet(np.ones(10), size=X.shape[0]) if with_proba else None
        state = trackers.new_state()
        for t in range(3):
            state, scores = trackers.update(state, X, None, proba, float(t))
            assert set(scores) == SCORE_NAMES
            assert all(0.0 <= v <= 1.0 for v in scores.values())
        trackers.decode(trackers.encode(state))


class TestTime:
    def test_evidence_decays_with_time(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A session's risk decays with the documented half-life and peek never goes back in time."""
        state = trackers.new_state()
        rows = uniform_stream(64, np.random.default_rng(0), 12, hi=16.0)
        for i, row in enumerate(rows):
            state, scores = trackers.update(state, row[None], None, None, float(i))
        now = float(len(rows) - 1)
        assert trackers.peek(state, now) == scores
        assert trackers.peek(state, now - 100) == scores
        half = trackers.config.half_life
        assert trackers.peek(state, now + half)["session.risk"] < scores["session.risk"]
        assert trackers.peek(state, now + 40 * half)["session.risk"] < 0.01

    def test_rate_grows_with_bursts_and_leaks(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A burst of 600 rows at once raises session.rate above 0.5; it leaks away over time."""
        state, scores = trackers.update(trackers.new_state(), digits.X_held[:600], None, None, 0.0)
        assert scores["session.rate"] > 0.5
        later = trackers.peek(state, 600.0 / trackers.config.rate_leak)
        assert later["session.rate"] == 0.0


class TestBatches:
    def test_batch_equals_rows_in_sequence(self, trackers: SessionTrackers, digits: Digits) -> None:
        """One batch update gives the same state as the same rows sent one by one at the same time."""
        X = digits.X_held[:25]
        labels = digits.model.predict(X)
        proba = digits.model.predict_proba(X)
        batch, _ = trackers.update(trackers.new_state(), X, labels, proba, 5.0)
        seq = trackers.new_state()
        for i in range(len(X)):
            seq, _ = trackers.update(seq, X[i : i + 1], labels[i : i + 1], proba[i : i + 1], 5.0)
        assert trackers.encode(batch) == trackers.encode(seq)

    def test_exact_repeats_only_count_for_rate(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Resending one row 50 times raises no evidence: retries tell an attacker nothing new."""
        rows = np.repeat(digits.X_held[:1], 50, axis=0)
        hist = run_stream(trackers, rows, digits.model)
        assert hist[-1]["session.risk"] == 0.0
        assert hist[-1]["session.rate"] > 0.0

    def test_string_labels_and_binary_probabilities(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Labels may be strings and probabilities a single column (binary models)."""
        X = digits.X_held[:5]
        state, scores = trackers.update(trackers.new_state(), X, np.array(["cat", "dog"] * 2 + ["cat"]),
                                        np.linspace(0, 1, 5)[:, None], 0.0)
        assert state.n_queries == 5
        assert all(0.0 <= v <= 1.0 for v in scores.values())


class TestValidation:
    @pytest.mark.parametrize(
        ("X", "message"),
        [(np.zeros((2, 63)), "shape"), (np.zeros((2, 64, 1)), "shape"), (np.full((1, 64), np.nan), "finite"),
         (np.full((1, 64), np.inf), "finite")],
    )
    def test_bad_rows_raise(self, trackers: SessionTrackers, X: np.ndarray, message: str) -> None:
        """Wrong width, wrong rank and non-finite values raise ValueError."""
        with pytest.raises(ValueError, match=message):
            trackers.update(trackers.new_state(), X, None, None, 0.0)

    def test_label_count_must_match(self, trackers: SessionTrackers, digits: Digits) -> None:
        """labels must have one entry per row."""
        with pytest.raises(ValueError, match="labels"):
            trackers.update(trackers.new_state(), digits.X_held[:3], np.array([1]), None, 0.0)

    def test_salt_is_required_and_keys_fingerprints(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A short salt is refused; another salt gives other fingerprints of the same shape."""
        with pytest.raises(ValueError, match="salt"):
            SessionTrackers(trackers.config, salt=b"short")
        other = SessionTrackers(trackers.config, salt=b"another-salt-value")
        a = trackers.fingerprints(digits.X_held[:4])
        b = other.fingerprints(digits.X_held[:4])
        assert a.shape == b.shape == (4, trackers.config.n_hashes)
        assert a.dtype == np.uint64
        assert not np.intersect1d(a[a != 0], b[b != 0]).size
        assert np.array_equal(a, trackers.fingerprints(digits.X_held[:4]))


class TestLargeBatches:
    def test_work_per_request_is_bounded(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A 1,000-row batch counts every row but tracks only max_rows_tracked of them, the same ones for
        the same rows whatever their order in the request."""
        rng = np.random.default_rng(0)
        X = rng.uniform(0, 16, size=(1000, 64))
        state, scores = trackers.update(trackers.new_state(), X, None, None, 0.0)
        assert state.n_queries == 1000
        assert state.n_fp == min(trackers.config.ring_fp, trackers.config.max_rows_tracked)
        assert scores["session.coverage"] > 0.5
        D = np.clip(digits.X_held[rng.integers(len(digits.X_held), size=1000)] + rng.normal(0, 1, (1000, 64)), 0, 16)
        a, _ = trackers.update(trackers.new_state(), D, None, None, 0.0)
        b, _ = trackers.update(trackers.new_state(), D[rng.permutation(1000)], None, None, 0.0)
        visited = int(np.unpackbits(a.cells).sum())
        assert 5 < visited <= trackers.config.max_rows_tracked
        assert np.array_equal(a.cells, b.cells)  # visited cells: an order-free view of the rows kept
