"""Cross-conformal calibration at reference sizes 100, 300, 1,000 and 5,000: honest on rows the fit never saw,
working thresholds on small references, absurd inputs blocked by the default policy's per-request rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import load_digits

from detectors import COMBINED, Profile, fit_profile
from detectors.profile import n_folds
from guard_agent.fit_command import StatelessRule, default_stateless_rules

from .conftest import Gaussian

SIZES = (100, 300, 1000, 5000)
FPR = 0.01


def _shifted_digits() -> np.ndarray:
    """Digits and their four one-pixel shifts (8,985 rows): the bundled image set large enough for 5,000."""
    X = load_digits().data.reshape(-1, 8, 8)
    shifts = [X, np.roll(X, 1, axis=1), np.roll(X, -1, axis=1), np.roll(X, 1, axis=2), np.roll(X, -1, axis=2)]
    return np.concatenate(shifts).reshape(-1, 64).astype(np.float64)


@pytest.fixture(scope="module")
def shifted_digits() -> np.ndarray:
    return _shifted_digits()


@pytest.fixture(scope="module")
def rules() -> tuple[StatelessRule, ...]:
    found = default_stateless_rules()
    assert {r.rule_id for r in found} >= {"ood-suspicious", "ood-extreme", "input-out-of-range"}
    return found


def _fired(profile: Profile, X: np.ndarray, rules: tuple[StatelessRule, ...], actions: set[str]) -> np.ndarray:
    scores = profile.score(X)
    hit = np.zeros(X.shape[0], dtype=bool)
    for rule in rules:
        if rule.action in actions:
            hit |= scores[rule.score] >= rule.threshold
    return hit


def _fit_split(X: np.ndarray, size: int, seed: int) -> tuple[Profile, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(X.shape[0])
    return fit_profile(X[perm[:size]], fpr=FPR, seed=seed), X[perm[size:]]


def _bound(n_cal: int, n_held: int, repeats: int) -> float:
    """Largest mean held-out rate at score >= 1 - FPR an honest calibration plausibly shows: the target plus three
    standard deviations of (the conditional coverage of n_cal calibration rows, averaged over `repeats` fits,
    and the binomial noise of n_held held-out rows per fit)."""
    sd = math.sqrt(FPR * (1 - FPR) / (n_cal + 2) / repeats + FPR / (n_held * repeats))
    return FPR + 3 * sd


class TestCrossConformal:
    def test_every_reference_row_calibrates(self, gauss: Gaussian) -> None:
        """All rows are calibration rows (the former split kept 25%), so 1% is reachable with 100 rows."""
        X = gauss.sample(100, seed=5)
        profile = fit_profile(X, fpr=FPR)
        assert profile.document["rows"] == {"reference": 100, "fit": 100, "calibration": 100}
        assert profile.document["calibration"] == {"method": "cross-conformal", "folds": n_folds(100)}
        for name, det in profile.detectors.items():
            assert det.calibration_scores_.shape == (100,), name
            assert profile.document["detectors"][name]["threshold"] is not None, name
        assert profile.document["combined"]["threshold"] is not None

    def test_calibration_scores_are_out_of_fold(self, gauss: Gaussian) -> None:
        """Each row is scored by a model that never saw it: a reference row is never out of its own range, yet
        some calibration rows are out of the range of the other folds."""
        X = gauss.sample(300, seed=6)
        profile = fit_profile(X, fpr=FPR)
        schema = profile.detectors["input.schema"]
        assert schema.score_samples(X).max() == 0.0
        assert schema.calibration_scores_.max() > 0.0

    def test_labels_stratify_the_folds(self, gauss: Gaussian) -> None:
        """With labels every fold holds its share of each class (a rare class is never absent from a fold's fit)."""
        from detectors.profile import _folds

        y = np.repeat([0, 1], [290, 10])
        fold = _folds(300, y, seed=0, k=10)
        for f in range(10):
            assert np.count_nonzero((fold == f) & (y == 1)) == 1


@pytest.mark.parametrize("size", SIZES)
class TestHonestOnHeldOutRows:
    def test_gaussian(self, gauss: Gaussian, size: int) -> None:
        """Fresh rows of the reference distribution: every detector and the combination fire at about 1%
        (within sampling error) at score >= 0.99, and the default policy's per-request rules stay silent."""
        repeats = 2 if size <= 300 else 1
        fresh = gauss.sample(10000, seed=99)
        rates: dict[str, list[float]] = {}
        for r in range(repeats):
            profile = fit_profile(gauss.sample(size, seed=1000 + r), fpr=FPR, seed=r)
            for name, s in profile.score(fresh).items():
                rates.setdefault(name, []).append(float(np.mean(s >= 1 - FPR)))
            assert float(np.mean(_fired(profile, fresh, default_stateless_rules(), {"flag", "block"}))) <= 1e-4
        for name, values in rates.items():
            assert float(np.mean(values)) <= _bound(size, fresh.shape[0], repeats), name

    def test_digits(self, shifted_digits: np.ndarray, size: int, rules: tuple[StatelessRule, ...]) -> None:
        """Held-out digits (integer pixels, near-constant corners): same bounds; no held-out row blocked."""
        repeats = 2 if size == 100 else 1
        rates: dict[str, list[float]] = {}
        n_held = 0
        for r in range(repeats):
            profile, held = _fit_split(shifted_digits, size, seed=r)
            n_held = held.shape[0]
            for name, s in profile.score(held).items():
                rates.setdefault(name, []).append(float(np.mean(s >= 1 - FPR)))
            assert not _fired(profile, held, rules, {"block"}).any()
            assert float(np.mean(_fired(profile, held, rules, {"flag", "block"}))) <= 1e-3
        for name, values in rates.items():
            assert float(np.mean(values)) <= _bound(size, n_held, repeats), name


class TestAbsurdInputsBlocked:
    @pytest.mark.parametrize("size", [100, 300, 1000])
    def test_noise_images(self, size: int, rules: tuple[StatelessRule, ...]) -> None:
        """Uniform noise images over the pixel scale [0, 16]: at least 60% blocked per request (measured 72-99%),
        and held-out digits with heavy noise (sigma = 15% of the range): at least 90% (measured 99%), from 100
        reference rows on (digits; 5,000 rows are more than the set holds). The former split blocked
        uniform noise at 100 rows only through the schema's untested fallback tail."""
        X = load_digits().data.astype(np.float64)
        profile, held = _fit_split(X, size, seed=7)
        rng = np.random.default_rng(8)
        uniform = rng.uniform(0, 16, size=(400, 64))
        heavy = held[:400] + rng.normal(0, 0.15 * 16, size=(400, 64))
        assert float(np.mean(_fired(profile, uniform, rules, {"block"}))) >= 0.6
        assert float(np.mean(_fired(profile, heavy, rules, {"block"}))) >= 0.9
        assert _fired(profile, uniform, rules, {"flag", "block"}).all()

    @pytest.mark.parametrize("size", SIZES)
    def test_far_out_rows(self, gauss: Gaussian, size: int, rules: tuple[StatelessRule, ...]) -> None:
        """Rows with a quarter of the features 20 range widths past the reference: all blocked, at every size."""
        X = gauss.sample(size, seed=11)
        profile = fit_profile(X, fpr=FPR)
        lo, hi = X.min(axis=0), X.max(axis=0)
        far = gauss.sample(200, seed=12)
        far[:, :2] = hi[:2] + 20 * (hi - lo)[:2]
        assert _fired(profile, far, rules, {"block"}).all()
        assert profile.score(far)[COMBINED].min() > 0.99
