"""TrackerConfig: fitting, serialisation, the default config, and behaviour on data that is not digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from detectors.trackers import SessionTrackers, TrackerConfig, fit_tracker_config

from .conftest import SALT, Digits, first_at, run_stream
from .streams import benign_stream, hsj_like, uniform_stream


class TestFit:
    def test_parts_round_trip_through_json(self, config: TrackerConfig, digits: Digits) -> None:
        """to_parts -> JSON -> from_parts rebuilds a config that scores a stream identically."""
        params, arrays = config.to_parts()
        params2 = json.loads(json.dumps(params))
        rebuilt = TrackerConfig.from_parts(params2, {k: np.array(v) for k, v in arrays.items()})
        rows = digits.X_held[:40]
        a = run_stream(SessionTrackers(config, salt=SALT), rows)
        b = run_stream(SessionTrackers(rebuilt, salt=SALT), rows)
        assert a == b
        assert rebuilt.layout_id == config.layout_id

    def test_from_parts_rejects_inconsistent_input(self, config: TrackerConfig) -> None:
        """Missing arrays, wrong schema, wrong types and bad shapes raise ValueError."""
        params, arrays = config.to_parts()
        with pytest.raises(ValueError, match="missing tracker array"):
            TrackerConfig.from_parts(params, {k: v for k, v in arrays.items() if k != "scale"})
        with pytest.raises(ValueError, match="schema_version"):
            TrackerConfig.from_parts({**params, "schema_version": 99}, arrays)
        with pytest.raises(ValueError, match="integer"):
            TrackerConfig.from_parts({**params, "window": True}, arrays)
        with pytest.raises(ValueError, match="number"):
            TrackerConfig.from_parts({**params, "half_life": "soon"}, arrays)
        with pytest.raises(ValueError, match="shape"):
            TrackerConfig.from_parts(params, {**arrays, "center": arrays["center"][:3]})
        with pytest.raises(ValueError, match="finite"):
            TrackerConfig.from_parts(params, {**arrays, "scale": np.full_like(arrays["scale"], np.nan)})
        with pytest.raises(ValueError, match="numeric"):
            TrackerConfig.from_parts(params, {**arrays, "scale": arrays["scale"].astype(str)})

    def test_fit_rejects_bad_reference_data(self) -> None:
        """Too few rows, non-finite values and mismatched labels are refused."""
        with pytest.raises(ValueError, match="20 rows"):
            fit_tracker_config(np.zeros((5, 3)))
        bad = np.random.default_rng(0).normal(size=(50, 4))
        bad[3, 2] = np.inf
        with pytest.raises(ValueError, match="finite"):
            fit_tracker_config(bad)
        with pytest.raises(ValueError, match="labels"):
            fit_tracker_config(np.zeros((50, 4)), np.zeros(7))

    def test_fit_flattens_images_and_is_deterministic(self, digits: Digits) -> None:
        """(n, 8, 8) input is flattened per row, and the same seed gives the same config."""
        a = fit_tracker_config(digits.X_ref.reshape(-1, 8, 8), seed=3)
        b = fit_tracker_config(digits.X_ref, seed=3)
        assert a.n_features == 64
        pa, aa = a.to_parts()
        pb, ab = b.to_parts()
        assert pa == pb
        assert all(np.array_equal(aa[k], ab[k]) for k in aa)

    def test_thresholds_are_fitted_not_constants(self, config: TrackerConfig) -> None:
        """The fit sets finite off-manifold quantiles, a neighbour threshold and a PRADA delta in (0, 1)."""
        assert math.isfinite(config.residual_threshold) and config.residual_threshold > 0
        assert config.nn_threshold > 0
        assert 0.0 < config.prada_delta < 1.0
        assert 0.0 < config.p0_rare < 0.5
        assert config.fitted


class TestDefault:
    def test_default_config_works_without_reference(self, digits: Digits) -> None:
        """With no profile, fingerprints still catch a near-duplicate attack on the model's boundary (its
        near-duplicates are answered with both classes); coverage/neighbours stay 0."""
        cfg = TrackerConfig.default(64)
        tr = SessionTrackers(cfg, salt=SALT)
        model = make_pipeline(FunctionTransformer(lambda x: 16.0 * x), digits.model)  # inputs scaled to [0, 1]
        x0 = digits.X_held[0] / 16.0
        hist = run_stream(tr, hsj_like(x0, np.random.default_rng(1), 80, predict=model.predict), model)
        assert first_at(hist, "session.fingerprint", 0.5) is not None
        assert all(h["session.coverage"] == 0.0 and h["session.neighbors"] == 0.0 for h in hist)
        assert not cfg.fitted

    def test_default_rejects_zero_features(self) -> None:
        """n_features must be positive."""
        with pytest.raises(ValueError, match="n_features"):
            TrackerConfig.default(0)


def _mixture(rng: np.random.Generator, n: int, d: int, scales: np.ndarray) -> np.ndarray:
    """A 6-component Gaussian mixture with heterogeneous feature scales (tabular-like)."""
    means = rng.normal(0.0, 3.0, size=(6, d))
    comp = rng.integers(6, size=n)
    return (means[comp] + rng.normal(size=(n, d))) * scales


@pytest.mark.parametrize("d", [5, 12, 128])
class TestOtherData:
    def test_benign_quiet_attacks_caught(self, d: int) -> None:
        """On tabular-like and embedding-like data the fitted trackers keep benign streams below flag
        and still catch uniform-random and near-duplicate probing streams."""
        rng = np.random.default_rng(d)
        scales = np.exp(rng.uniform(-3, 3, size=d))
        X = _mixture(rng, 3000, d, scales)
        ref, held = X[:2000], X[2000:]
        tr = SessionTrackers(fit_tracker_config(ref, seed=1), salt=SALT)
        lo, hi = ref.min(axis=0), ref.max(axis=0)
        for s in range(15):
            r = np.random.default_rng(100 + s)
            rows = benign_stream(held, r, 120, p_shift=0.0, lo=lo, hi=hi)
            assert max(h["session.risk"] for h in run_stream(tr, rows)) < 0.5
        uni = lo + (hi - lo) * uniform_stream(d, rng, 60)
        assert first_at(run_stream(tr, uni), "session.risk", 0.95) is not None
        probe = hsj_like(held[0], rng, 80, lo=lo, hi=hi)
        assert first_at(run_stream(tr, probe), "session.risk", 0.95) is not None


@pytest.mark.parametrize("loader", ["breast_cancer", "digits"])
def test_off_manifold_thresholds_hold_on_new_rows(loader: str) -> None:
    """Held-out rows are off the manifold about as often as the 99.5 % quantile promises (at most 2.5 % here):
    the thresholds come from residuals of rows the projection was fitted without. In-sample residuals put
    5.3 % of held-out cancer rows off the manifold, and every edit of such a row counted as rare again."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    from detectors.trackers._features import residual_and_norm

    X, y = getattr(datasets, f"load_{loader}")(return_X_y=True)
    X_ref, X_new, y_ref, _ = train_test_split(X.astype(np.float64), y, test_size=0.3, random_state=0, stratify=y)
    cfg = fit_tracker_config(X_ref, y_ref)
    resid, norm = residual_and_norm(cfg, X_new)
    off = (resid > cfg.residual_threshold) | (norm > cfg.norm_threshold)
    assert off.mean() <= 0.025
