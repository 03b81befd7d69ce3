"""Shared fixtures: digits split into reference and held-out data, a fitted config and a classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from detectors.trackers import SessionTrackers, TrackerConfig, fit_tracker_config

SALT = b"test-salt-0123456789"


@dataclass(frozen=True)
class Digits:
    """Reference (fit) rows, held-out rows the fit never saw, and a model trained on the reference."""

    X_ref: np.ndarray
    y_ref: np.ndarray
    X_held: np.ndarray
    y_held: np.ndarray
    model: LogisticRegression


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The digits data set split 2:1, with a logistic-regression model."""
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(X))
    ref, held = perm[:1200], perm[1200:]
    model = LogisticRegression(max_iter=3000).fit(X[ref], y[ref])
    return Digits(X[ref].astype(np.float64), y[ref], X[held].astype(np.float64), y[held], model)


@pytest.fixture(scope="session")
def config(digits: Digits) -> TrackerConfig:
    """Tracker config fitted on the reference split with the model's predicted labels."""
    return fit_tracker_config(digits.X_ref, digits.model.predict(digits.X_ref), seed=0)


@pytest.fixture(scope="session")
def trackers(config: TrackerConfig) -> SessionTrackers:
    """Trackers over the fitted config."""
    return SessionTrackers(config, salt=SALT)


def run_stream(
    trackers: SessionTrackers,
    rows: np.ndarray,
    model: LogisticRegression | None = None,
    *,
    dt: float = 1.0,
    stop_risk: float | None = None,
) -> list[dict[str, float]]:
    """Feed rows one request at a time (answers from ``model`` when given); return scores after each,
    stopping early once session.risk reaches ``stop_risk``."""
    state = trackers.new_state()
    out = []
    for i, row in enumerate(rows):
        x = row[None, :]
        proba = model.predict_proba(x) if model is not None else None
        state, scores = trackers.update(state, x, None, proba, i * dt)
        out.append(scores)
        if stop_risk is not None and scores["session.risk"] >= stop_risk:
            break
    return out


def first_at(history: list[dict[str, float]], name: str, threshold: float) -> int | None:
    """1-based index of the first query whose score ``name`` reached ``threshold``, or None."""
    for i, scores in enumerate(history):
        if scores[name] >= threshold:
            return i + 1
    return None
