"""Real ART black-box attacks (in-process, no HTTP) against a logistic regression on digits."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from detectors.trackers import SessionTrackers

from .conftest import Digits, first_at, run_stream

pytestmark = pytest.mark.slow

art = pytest.importorskip("art")


MAX_RECORDED = 120


class _Enough(Exception):
    """Raised from the attack's predict once MAX_RECORDED queries are recorded: the tests need no more."""


def _recorded_attack(digits: Digits, make_attack: str, index: int) -> np.ndarray:
    """Run one ART attack on held-out image ``index`` and return the first MAX_RECORDED rows it queried, in order.

    The attacks get ART's default trust-region patience (num_trial=25) and enough iterations that they
    cannot give up or finish before MAX_RECORDED queries: with num_trial=5 BoundaryAttack sometimes
    stopped after 25 queries ("adversarial example found but not optimal") on another CPU, where the
    logistic regression comes out a little different."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    queries: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        if len(queries) >= MAX_RECORDED:
            raise _Enough
        x = np.asarray(x, dtype=np.float64).reshape(-1, 64)
        queries.extend(x)
        return np.eye(10)[digits.model.predict(x)]

    clf = BlackBoxClassifier(predict, input_shape=(64,), nb_classes=10, clip_values=(0.0, 16.0))
    np.random.seed(index)  # ART draws from numpy's global generator
    if make_attack == "hsj":
        attack = HopSkipJump(clf, targeted=False, max_iter=10, max_eval=100, init_eval=100, verbose=False)
    else:
        attack = BoundaryAttack(clf, targeted=False, max_iter=50, num_trial=25, sample_size=5, init_size=20,
                                verbose=False)
    with contextlib.suppress(_Enough):
        attack.generate(digits.X_held[index : index + 1].astype(np.float32))
    return np.asarray(queries[:MAX_RECORDED])


@pytest.mark.parametrize("attack", ["hsj", "boundary"])
def test_real_black_box_attacks_blocked_within_25(trackers: SessionTrackers, digits: Digits, attack: str) -> None:
    """ART HopSkipJump and BoundaryAttack query streams reach session.risk >= 0.95 within 25 queries
    (for 3 different images), and the fingerprint tracker flags them within a few dozen (it counts only
    near-duplicates answered with another class, which Boundary's first probes are not: up to 60)."""
    for index in range(3):
        rows = _recorded_attack(digits, attack, index)
        assert rows.shape[0] > 30
        hist = run_stream(trackers, rows, digits.model)
        assert (first_at(hist, "session.risk", 0.95) or 999) <= 25, attack
        assert (first_at(hist, "session.fingerprint", 0.5) or 999) <= 60, attack
