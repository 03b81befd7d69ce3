"""Property tests for numeric edge cases: whatever finite data comes in, detectors fit and score sanely."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from detectors import COMBINED, DETECTOR_CLASSES, fit_profile

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
matrices = st.integers(1, 30).flatmap(
    lambda n: st.integers(1, 6).flatmap(lambda d: arrays(np.float64, (n, d), elements=finite))
)
FAST = {"ood.iforest": {"n_estimators": 10}}


@pytest.mark.parametrize("name", list(DETECTOR_CLASSES))
class TestDetectorEdgeCases:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(X=matrices)
    def test_any_finite_reference_fits_and_scores_finite(self, name: str, X: np.ndarray) -> None:
        """Single rows, constant or duplicated features: fit works and scores are finite, one per row."""
        det = DETECTOR_CLASSES[name](**FAST.get(name, {})).fit(X)  # type: ignore[arg-type]
        scores = det.score_samples(X)
        assert scores.shape == (X.shape[0],)
        assert np.isfinite(scores).all()

    @settings(max_examples=15, deadline=None)
    @given(value=st.floats(-1e3, 1e3), n=st.integers(1, 20))
    def test_constant_reference(self, name: str, value: float, n: int) -> None:
        """A constant reference scores its own value finitely and no lower than any far-away value."""
        X = np.full((n, 3), value)
        det = DETECTOR_CLASSES[name](**FAST.get(name, {})).fit(X)  # type: ignore[arg-type]
        own = det.score_samples(X[:1])[0]
        far = det.score_samples(X[:1] + 1e4)[0]
        assert np.isfinite(own)
        assert far >= own

    @settings(max_examples=15, deadline=None)
    @given(d=st.integers(1, 5), wrong=st.integers(1, 8), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
    def test_bad_inputs_always_value_error(self, name: str, d: int, wrong: int, bad: float) -> None:
        """Non-finite values and wrong widths raise ValueError, never another exception or a score."""
        det = DETECTOR_CLASSES[name](**FAST.get(name, {})).fit(np.random.default_rng(0).normal(size=(30, d)))  # type: ignore[arg-type]
        row = np.zeros((1, d))
        row[0, 0] = bad
        with pytest.raises(ValueError, match=r"NaN|infinity"):
            det.score_samples(row)
        if wrong != d:
            with pytest.raises(ValueError, match="features"):
                det.score_samples(np.zeros((1, wrong)))


class TestProfileProperties:
    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(X=st.integers(10, 60).flatmap(lambda n: arrays(np.float64, (n, 3), elements=finite)))
    def test_profile_scores_in_unit_interval(self, X: np.ndarray) -> None:
        """For any finite reference of at least 10 rows, calibrated scores lie in [0, 1] and are finite."""
        prof = fit_profile(X, detectors=["schema", "mahalanobis", "knn", "pca"])
        scores = prof.score(np.vstack([X, X * 3 + 1]))
        for values in scores.values():
            assert np.isfinite(values).all()
            assert values.min() >= 0.0
            assert values.max() <= 1.0
        assert COMBINED in scores
