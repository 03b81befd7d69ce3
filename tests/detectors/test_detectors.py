"""Unit tests for each stateless detector: shapes, sign, FPR on fresh samples, state round trip, input
checks."""

from __future__ import annotations

import math
from typing import Any

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
from detectors._base import Tail, conformal_p_values, fit_tail, gpd_fit

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

    def test_constant_feature_excess_is_in_pooled_range_units(self) -> None:
        """Ink on a never-inked pixel counts one feature plus its value in typical-range units, not raw units."""
        rng = np.random.default_rng(0)
        X = np.column_stack([np.zeros(500), rng.uniform(0, 16, size=(500, 3))])
        det = SchemaRange().fit(X)
        assert det.score_samples([[8.0, 5.0, 5.0, 5.0]])[0] == pytest.approx(1.0 + 8.0 / 16.0, abs=0.02)

    def test_rarely_moving_feature_range_is_shrunk_toward_the_pooled_range(self) -> None:
        """A range set by 3 rows is widened toward the typical range (prior_rows=0 keeps the raw range)."""
        rng = np.random.default_rng(0)
        X = np.column_stack([np.zeros(1000), rng.uniform(0, 16, size=(1000, 3))])
        X[:3, 0] = [1.0, 2.0, 3.0]
        row = [[16.0, 5.0, 5.0, 5.0]]
        shrunk = 3.0 ** (3 / 13) * 16.0 ** (10 / 13)  # own range^(k/(k+prior_rows)) * pooled^(prior_rows/(k+...))
        assert SchemaRange().fit(X).score_samples(row)[0] == pytest.approx(1.0 + 13.0 / shrunk, abs=0.02)
        assert SchemaRange(prior_rows=0).fit(X).score_samples(row)[0] == pytest.approx(1.0 + 13.0 / 3.0, abs=0.02)

    def test_well_observed_features_keep_their_own_units(self) -> None:
        """Features that move in most rows are measured in their own range, whatever the other features' units."""
        rng = np.random.default_rng(0)
        X = np.column_stack([rng.uniform(0, 0.01, 1000), rng.uniform(0, 1000, 1000)])
        det = SchemaRange().fit(X)
        assert 1.85 < det.score_samples([[0.02, 500.0]])[0] <= 2.0  # about one own range width of excess (+1)

    def test_prior_rows_round_trip_and_validation(self) -> None:
        """prior_rows is stored with the state; a negative or non-integer value is refused at fit."""
        X = np.random.default_rng(0).normal(size=(100, 3))
        det = SchemaRange(prior_rows=4).fit(X)
        assert SchemaRange.from_state(*det.get_state()).prior_rows == 4
        for bad in (-1, 2.5, True):
            with pytest.raises(ValueError, match="prior_rows"):
                SchemaRange(prior_rows=bad).fit(X)  # type: ignore[arg-type]


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
        """Beyond the largest calibration score p keeps falling from 1/(n + 1), down to the 1e-300 floor."""
        det = Mahalanobis().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        n_cal = 1000
        top = det.calibration_scores_[-1]
        p = det.p_values([top * 1.01, top * 2, top * 100, 1e300])
        assert p[0] <= 1 / (n_cal + 1)
        assert p[0] > p[1] > p[2] >= 1e-300
        assert p[2] < 1e-9
        assert p[3] == 1e-300

    def test_tail_keeps_fpr_at_extreme_thresholds(self, gauss: Gaussian, reference: np.ndarray) -> None:
        """With 1000 calibration rows a p < 0.0005 cut (beyond the empirical floor) fires on <= ~0.1% of inliers."""
        det = KNNDistance().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        p = det.p_values(det.score_samples(gauss.sample(20000, seed=41)))
        assert float(np.mean(p < 0.0005)) < 0.0015

    @pytest.mark.parametrize(
        "draw",
        [lambda r, n: r.lognormal(0.0, 1.0, n), lambda r, n: np.abs(r.standard_t(3, n)), lambda r, n: r.pareto(2.0, n)],
        ids=["lognormal", "student-t3", "pareto"],
    )
    def test_heavy_tailed_scores_keep_their_rate_beyond_the_calibration(self, draw: Any) -> None:
        """Heavy-tailed scores (1000 calibration rows): p <= 1e-5 fires on at most ~1e-5 of fresh scores, where
        an exponential tail fitted to the same top scores fires 15-40 times too often."""
        fitted, exponential = [], []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            cal, fresh = np.sort(draw(rng, 1000)), draw(rng, 200_000)
            fitted.append(np.mean(conformal_p_values(cal, fresh, fit_tail(cal)) <= 1e-5))
            top10 = cal[-101:]
            plain = Tail(float(cal[-1]), float(np.mean(top10[1:] - top10[0])))  # a plain exponential tail
            exponential.append(np.mean(conformal_p_values(cal, fresh, plain) <= 1e-5))
        assert float(np.mean(fitted)) <= 2e-5
        assert float(np.mean(exponential)) > 1e-4  # the test can fail: the plain tail does

    def test_gpd_fit_recovers_the_shape(self) -> None:
        """The generalised Pareto estimate finds shape 0 for exponential and 0.5 for Lomax(2) excesses."""
        rng = np.random.default_rng(0)
        assert gpd_fit(rng.exponential(2.0, 5000))[0] == pytest.approx(0.0, abs=0.05)
        shape, scale = gpd_fit(rng.pareto(2.0, 5000))
        assert shape == pytest.approx(0.5, abs=0.08)
        assert scale == pytest.approx(0.5, rel=0.15)

    def test_light_tails_are_exponential_heavy_tails_polynomial(self) -> None:
        """A bounded (uniform) score gets the mildest polynomial tail, the margin alone (2 / sqrt(exceedances)),
        never a bounded one; a Pareto score a heavy one."""
        rng = np.random.default_rng(1)
        light = fit_tail(np.sort(rng.uniform(0.0, 1.0, 1000)))
        heavy = fit_tail(np.sort(rng.pareto(2.0, 1000)))
        assert light is not None and light.shape == pytest.approx(2.0 / np.sqrt(light.exceedances))
        assert heavy is not None and heavy.shape >= 0.5
        assert fit_tail(np.sort(rng.normal(size=15))) is None  # too few rows
        assert fit_tail(np.zeros(500)) is None  # no positive excesses

    def test_schema_tail_is_never_lighter_than_a_unit_exponential(self, reference: np.ndarray) -> None:
        """Beyond its calibration max each further feature out of range divides the schema p by at most e."""
        det = SchemaRange().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        top = det.calibration_scores_[-1]
        p = det.p_values([top + 1.0, top + 3.0, top + 30.0, top + 1000.0])
        for extra, value in zip([1.0, 3.0, 30.0], p[:3], strict=False):
            assert value >= np.exp(-extra) / 1001 * (1 - 1e-9)
        assert 1.0 - p[3] == 1.0  # far beyond: the calibrated score is exactly 1.0
        assert det.get_state()[0]["tail"]["scale"] >= 1.0

    def test_tampered_tail_refused(self, reference: np.ndarray) -> None:
        """A tail with a negative scale or shape, missing fields or a non-integer count is refused."""
        det = PCAReconstruction().fit(reference[:2000])
        det.infer_threshold(reference[2000:], fpr=0.01)
        params, arrays = det.get_state()
        good = params["tail"]
        assert PCAReconstruction.from_state(params, arrays).tail_ == det.tail_
        for bad in (
            {**good, "scale": -1.0},
            {**good, "shape": -0.5},
            {**good, "exceedances": True},
            {"scale": 1.0, "shape": 0.0},
            1.0,
        ):
            with pytest.raises(ValueError, match="tail"):
                PCAReconstruction.from_state({**params, "tail": bad}, arrays)
