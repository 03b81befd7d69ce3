"""Real ART black-box attacks (in-process, no HTTP) against a logistic regression on digits."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.trackers import SessionTrackers

from .conftest import Digits, first_at, run_stream

pytestmark = pytest.mark.slow

art = pytest.importorskip("art")


def _recorded_attack(digits: Digits, make_attack: str, index: int) -> np.ndarray:
    """Run one ART attack on held-out image ``index`` and return every row it queried, in order."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    queries: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, 64)
        queries.extend(x)
        return np.eye(10)[digits.model.predict(x)]

    clf = BlackBoxClassifier(predict, input_shape=(64,), nb_classes=10, clip_values=(0.0, 16.0))
    np.random.seed(index)  # ART draws from numpy's global generator
    if make_attack == "hsj":
        attack = HopSkipJump(clf, targeted=False, max_iter=1, max_eval=100, init_eval=100, verbose=False)
    else:
        attack = BoundaryAttack(clf, targeted=False, max_iter=5, num_trial=5, sample_size=5, init_size=20,
                                verbose=False)
    attack.generate(digits.X_held[index : index + 1].astype(np.float32))
    return np.asarray(queries)


@pytest.mark.parametrize("attack", ["hsj", "boundary"])
def test_real_black_box_attacks_blocked_within_25(trackers: SessionTrackers, digits: Digits, attack: str) -> None:
    """ART HopSkipJump and BoundaryAttack query streams reach session.risk >= 0.95 within 25 queries
    (for 3 different images), and the fingerprint tracker flags them within a few dozen."""
    for index in range(3):
        rows = _recorded_attack(digits, attack, index)
        assert rows.shape[0] > 30
        hist = run_stream(trackers, rows, digits.model)
        assert (first_at(hist, "session.risk", 0.95) or 999) <= 25, attack
        assert (first_at(hist, "session.fingerprint", 0.5) or 999) <= 40, attack
