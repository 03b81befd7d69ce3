"""The two performance shortcuts: the approximate kNN index and the array-based Isolation Forest."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from detectors import IsolationForestDetector, KNNDistance
from detectors.iforest import flatten_forest


class TestKNNIndex:
    def test_auto_picks_exact_for_small_and_ivf_for_large(self) -> None:
        """index='auto' records 'exact' up to exact_max rows and 'ivf' above."""
        rng = np.random.default_rng(0)
        small = KNNDistance(exact_max=500).fit(rng.normal(size=(400, 5)))
        large = KNNDistance(exact_max=500).fit(rng.normal(size=(900, 5)))
        assert small.get_state()[0]["index_kind"] == "exact"
        assert large.get_state()[0]["index_kind"] == "ivf"
        assert large.get_state()[0]["n_cells"] == 30

    def test_exact_matches_brute_force_distance(self) -> None:
        """The exact index returns the true k-th neighbour distance in standardised units."""
        rng = np.random.default_rng(1)
        R, Q = rng.normal(size=(300, 6)), rng.normal(size=(20, 6))
        det = KNNDistance(index="exact", n_neighbors=3, standardize=False).fit(R)
        d = np.sqrt(((Q[:, None, :] - R[None]) ** 2).sum(-1))
        np.testing.assert_allclose(det.score_samples(Q), np.sort(d, axis=1)[:, 2], rtol=1e-4, atol=1e-4)

    def test_ivf_never_below_exact_and_usually_equal(self) -> None:
        """The cell index only misses neighbours: its distance is >= the exact one and mostly the same."""
        rng = np.random.default_rng(2)
        R, Q = rng.normal(size=(3000, 8)), rng.normal(size=(300, 8))
        exact = KNNDistance(index="exact").fit(R).score_samples(Q)
        approx = KNNDistance(index="ivf").fit(R).score_samples(Q)
        assert np.all(approx >= exact - 1e-4)
        assert np.corrcoef(exact, approx)[0, 1] > 0.9

    def test_single_row_and_batch_agree(self) -> None:
        """Scoring rows one at a time gives the batch result (the hot path is the single-row case)."""
        rng = np.random.default_rng(3)
        det = KNNDistance(index="ivf").fit(rng.normal(size=(2000, 4)))
        Q = rng.normal(size=(10, 4))
        one_by_one = np.array([det.score_samples(q[None])[0] for q in Q])
        np.testing.assert_allclose(one_by_one, det.score_samples(Q), rtol=1e-6)

    def test_k_is_capped_by_reference_size(self) -> None:
        """Three reference rows with k=5 work: k becomes 3."""
        det = KNNDistance(n_neighbors=5).fit(np.arange(6.0).reshape(3, 2))
        assert det.get_state()[0]["k"] == 3
        assert det.score_samples([[0.0, 1.0]]).shape == (1,)


class TestIsolationForestArrays:
    @pytest.mark.parametrize("max_features", [1.0, 0.5])
    def test_matches_sklearn_to_1e9(self, max_features: float) -> None:
        """The vectorised array traversal reproduces -IsolationForest.score_samples to 1e-9 (batch and
        single)."""
        rng = np.random.default_rng(4)
        X, Q = rng.normal(size=(1500, 12)), rng.normal(size=(400, 12)) * 2
        forest = IsolationForest(n_estimators=60, max_features=max_features, random_state=7).fit(X)
        det = IsolationForestDetector.__new__(IsolationForestDetector)
        det.n_features_in_ = 12
        det._set_arrays(flatten_forest(forest), int(forest.max_samples_))
        expected = -forest.score_samples(Q)
        np.testing.assert_allclose(det.score_samples(Q), expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(det.score_samples(Q[:1]), expected[:1], rtol=0, atol=1e-9)

    def test_public_fit_matches_sklearn_with_same_seed(self) -> None:
        """IsolationForestDetector(seed=s) equals sklearn's forest with random_state=s."""
        rng = np.random.default_rng(5)
        X = rng.normal(size=(800, 5))
        det = IsolationForestDetector(n_estimators=40, seed=3).fit(X)
        forest = IsolationForest(n_estimators=40, random_state=3).fit(X)
        np.testing.assert_allclose(det.score_samples(X[:50]), -forest.score_samples(X[:50]), atol=1e-9)

    def test_thresholds_just_above_float32_values_branch_like_sklearn(self) -> None:
        """Rows equal to a float32 value next to a float64 split go the same way as in sklearn."""
        X = np.linspace(0, 1, 257)[:, None].astype(np.float32).astype(np.float64)
        forest = IsolationForest(n_estimators=20, random_state=0).fit(X)
        det = IsolationForestDetector.__new__(IsolationForestDetector)
        det.n_features_in_ = 1
        det._set_arrays(flatten_forest(forest), int(forest.max_samples_))
        np.testing.assert_allclose(det.score_samples(X), -forest.score_samples(X), atol=1e-12)

    def test_tampered_node_index_is_refused(self) -> None:
        """A 'left' index pointing outside the node arrays is rejected when the state is restored."""
        det = IsolationForestDetector(n_estimators=5).fit(np.random.default_rng(6).normal(size=(100, 3)))
        params, arrays = det.get_state()
        bad = dict(arrays)
        bad["left"] = arrays["left"].copy()
        bad["left"][0] = 10**9
        with pytest.raises(ValueError, match="out of range"):
            IsolationForestDetector.from_state(params, bad)


class TestKNNMaxReference:
    def test_large_reference_is_subsampled_and_recorded(self) -> None:
        """Above max_reference rows the index keeps a seeded subset of that size, recorded in the state."""
        X = np.random.default_rng(8).normal(size=(3000, 3))
        det = KNNDistance(max_reference=1000, seed=4).fit(X)
        params, arrays = det.get_state()
        assert params["n_reference"] == 1000
        assert arrays["reference"].shape == (1000, 3)
        again = KNNDistance(max_reference=1000, seed=4).fit(X)
        np.testing.assert_array_equal(again.get_state()[1]["reference"], arrays["reference"])
