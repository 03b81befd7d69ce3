"""Unit tests for each stateless detector: shapes, sign, FPR on fresh samples, state round trip, input
checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detectors import (
    BaseDetector,
    IsolationForestDetector,
    KNNDistance,
    Mahalanobis,
    NotFittedError,
    PCAReconstruction,
    SchemaRange,
)

from .conftest import Gaussian

FACTORIES = {
    "schema": lambda: SchemaRange(),
    "mahalanobis": lambda: Mahalanobis(),
    "mahalanobis_whiten": lambda: Mahalanobis(n_components=0.9),
    "knn_exact": lambda: KNNDistance(index="exact"),
    "knn_ivf": lambda: KNNDistance(index="ivf"),
    "pca": lambda: PCAReconstruction(),
    "iforest": lambda: IsolationForestDetector(n_estimators=50),
}
CONTINUOUS = [k for k in FACTORIES if k != "schema"]  # schema scores 0 inside the box: FPR is one-sided


@pytest.fixture(params=list(FACTORIES), scope="module")
def fitted(request: pytest.FixtureRequest, gauss: Gaussian, reference: np.ndarray) -> tuple[str, BaseDetector]:
    det = FACTORIES[request.param]().fit(reference[:2000])
    det.infer_threshold(reference[2000:], fpr=0.05)
    return request.param, det


class TestDetectorContract:
    def test_scores_one_finite_value_per_row(self, fitted: tuple[str, BaseDetector], gauss: Gaussian) -> None:
        """score_samples returns a finite float vector with one entry per input row."""
        _, det = fitted
        scores = det.score_samples(gauss.sample(37, seed=5))
        assert scores.shape == (37,)
        assert scores.dtype == np.float64
        assert np.isfinite(scores).all()

    def test_higher_means_more_anomalous(self, fitted: tuple[str, BaseDetector], gauss: Gaussian) -> None:
        """Rows far from the reference score higher than fresh in-distribution rows, for every detector."""
        _, det = fitted
        inlier = gauss.sample(500, seed=6)
        outlier = inlier + 8.0 * np.sign(np.random.default_rng(7).normal(size=inlier.shape))
        assert np.median(det.score_samples(outlier)) > np.quantile(det.score_samples(inlier), 0.95)

    @pytest.mark.parametrize("fpr", [0.05])
    def test_threshold_hits_target_fpr_on_fresh_samples(
        self, fitted: tuple[str, BaseDetector], gauss: Gaussian, fpr: float
    ) -> None:
        """The fitted threshold fires on about `fpr` of fresh in-distribution rows (never much more)."""
        name, det = fitted
        fresh = det.score_samples(gauss.sample(20000, seed=11))
        observed = float(np.mean(fresh > det.threshold_))
        assert observed <= fpr + 0.025
        if name in CONTINUOUS:
            assert observed >= fpr - 0.025

    def test_p_values_are_uniform_enough_in_distribution(
        self, fitted: tuple[str, BaseDetector], gauss: Gaussian
    ) -> None:
        """p-values of fresh inliers are in (0, 1] and P(p <= 0.1) is close to 0.1 for continuous scores."""
        name, det = fitted
        p = det.p_values(det.score_samples(gauss.sample(5000, seed=12)))
        assert p.min() > 0
        assert p.max() <= 1
        if name in CONTINUOUS:
            assert abs(float(np.mean(p <= 0.1)) - 0.1) < 0.03

    def test_state_round_trip_gives_identical_scores(self, fitted: tuple[str, BaseDetector], gauss: Gaussian) -> None:
        """from_state(get_state()) rebuilds a detector with bit-identical scores, p-values and threshold."""
        _, det = fitted
        params, arrays = det.get_state()
        clone = type(det).from_state(params, arrays)
        X = gauss.sample(200, seed=13)
        np.testing.assert_array_equal(clone.score_samples(X), det.score_samples(X))
        np.testing.assert_array_equal(clone.p_values(det.score_samples(X)), det.p_values(det.score_samples(X)))
        assert clone.threshold_ == det.threshold_

    def test_rejects_wrong_feature_count(self, fitted: tuple[str, BaseDetector], gauss: Gaussian) -> None:
        """A row with the wrong number of features is refused with a message naming both counts."""
        _, det = fitted
        with pytest.raises(ValueError, match=r"has 9 features, expected 8"):
            det.score_samples(np.zeros((1, 9)))

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
    def test_rejects_non_finite_values(self, fitted: tuple[str, BaseDetector], bad: float) -> None:
        """NaN, infinities and values beyond float32 are refused with a clear ValueError, never scored."""
        _, det = fitted
        X = np.zeros((3, 8))
        X[2, 5] = bad
        with pytest.raises(ValueError, match=r"NaN|infinity") as info:
            det.score_samples(X)
        assert "row 2, feature 5" in str(info.value)

    def test_rejects_non_numeric_input(self, fitted: tuple[str, BaseDetector]) -> None:
        """Strings are not silently coerced."""
        _, det = fitted
        with pytest.raises(ValueError, match="numeric"):
            det.score_samples(np.array([["a"] * 8]))


class TestNotFitted:
    @pytest.mark.parametrize("name", list(FACTORIES))
    def test_score_before_fit_raises(self, name: str) -> None:
        """Scoring an unfitted detector raises NotFittedError instead of an AttributeError."""
        with pytest.raises(NotFittedError):
            FACTORIES[name]().score_samples(np.zeros((1, 3)))

    def test_p_values_before_threshold_raises(self, reference: np.ndarray) -> None:
        """p-values need calibration scores; without infer_threshold they are refused."""
        det = Mahalanobis().fit(reference)
        with pytest.raises(NotFittedError, match="infer_threshold"):
            det.p_values([1.0])


class TestThresholdEdgeCases:
    def test_too_few_calibration_rows_never_fire(self, reference: np.ndarray) -> None:
        """With 20 calibration rows a 1% FPR is unreachable: the threshold is +inf and saved as null."""
        det = Mahalanobis().fit(reference[:500])
        assert math.isinf(det.infer_threshold(reference[500:520], fpr=0.01))
        params, _ = det.get_state()
        assert params["threshold"] is None

    def test_fpr_outside_unit_interval_refused(self, reference: np.ndarray) -> None:
        """fpr must be strictly between 0 and 1."""
        det = Mahalanobis().fit(reference[:500])
        with pytest.raises(ValueError, match="fpr"):
            det.infer_threshold(reference[500:600], fpr=1.5)


class TestSchemaRange:
    def test_in_range_rows_score_zero_and_count_features(self) -> None:
        """Inside the learned box the score is 0; outside it counts features plus excess in range-widths."""
        X = np.random.default_rng(0).uniform(0, 1, size=(500, 4))
        det = SchemaRange().fit(X)
        assert det.score_samples(X).max() == 0.0
        score = det.score_samples([[2.0, -1.0, 0.5, 0.5]])[0]
        assert score == pytest.approx(4.0, abs=0.02)  # 2 features out, each by about one range-width

    def test_constant_feature_deviation_counts(self) -> None:
        """A feature constant in the reference flags any other value instead of dividing by zero."""
        X = np.column_stack([np.zeros(100), np.random.default_rng(0).normal(size=100)])
        det = SchemaRange().fit(X)
        assert det.score_samples([[0.0, 0.0]])[0] == 0.0
        assert det.score_samples([[1e-3, 0.0]])[0] >= 1.0


class TestMahalanobisLabels:
    def test_class_conditional_means_see_gaps_between_classes(self) -> None:
        """With labels, a point between two tight clusters is far from both class means (score is the min)."""
        rng = np.random.default_rng(0)
        X = np.vstack([rng.normal(-5, 0.3, size=(300, 2)), rng.normal(5, 0.3, size=(300, 2))])
        y = np.repeat([0, 1], 300)
        plain = Mahalanobis().fit(X)
        per_class = Mahalanobis().fit(X, y)
        middle = np.array([[0.0, 0.0]])
        assert per_class.score_samples(middle)[0] > 10 * plain.score_samples(middle)[0]
        assert per_class.get_state()[0]["n_classes"] == 2

    def test_whitening_keeps_requested_components(self, reference: np.ndarray) -> None:
        """An integer n_components keeps exactly that many whitened directions."""
        det = Mahalanobis(n_components=3).fit(reference)
        assert det.whiten_.shape == (8, 3)


class TestTail:
    def test_far_rows_get_p_values_below_the_empirical_floor(self, reference: np.ndarray) -> None:
        """Beyond the largest calibration score p keeps falling (exponential tail), down to the 1e-300 floor."""
        det = Mahalanobis().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        n_cal = 1000
        top = det.calibration_scores_[-1]
        p = det.p_values([top * 1.01, top * 2, top * 100, 1e300])
        assert p[0] < 1 / (n_cal + 1)
        assert p[0] > p[1] > p[2] >= 1e-300
        assert p[3] == 1e-300

    def test_tail_keeps_fpr_at_extreme_thresholds(self, gauss: Gaussian, reference: np.ndarray) -> None:
        """With 1000 calibration rows a p < 0.0005 cut (beyond the empirical floor) fires on <= ~0.1% of inliers."""
        det = KNNDistance().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        p = det.p_values(det.score_samples(gauss.sample(20000, seed=41)))
        assert float(np.mean(p < 0.0005)) < 0.0015

    def test_schema_uses_a_fixed_unit_tail(self, reference: np.ndarray) -> None:
        """Beyond its calibration max the schema p-value divides by e per extra feature out of range."""
        det = SchemaRange().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        assert det.get_state()[0]["tail_scale"] == 1.0
        top = det.calibration_scores_[-1]
        p = det.p_values([top + 1.0, top + 3.0, top + 1000.0])
        assert p[0] == pytest.approx(np.exp(-1.0) / 1001)
        assert p[1] == pytest.approx(np.exp(-3.0) / 1001)
        assert 1.0 - p[2] == 1.0

    def test_tampered_tail_scale_refused(self, reference: np.ndarray) -> None:
        """A negative or non-numeric tail_scale in the state is refused."""
        det = PCAReconstruction().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        params, arrays = det.get_state()
        with pytest.raises(ValueError, match="tail_scale"):
            PCAReconstruction.from_state({**params, "tail_scale": -1.0}, arrays)
