"""The gradient-step test (``detectors.trackers._steps``): what counts as ``x + lam * sign(g)`` and what does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from detectors.trackers import SessionTrackers, TrackerConfig
from detectors.trackers._steps import StepTest
from tests.trackers.conftest import SALT, Digits


def _hits(test: StepTest, trackers: SessionTrackers, rows: np.ndarray) -> list[bool]:
    """The test's verdict on each row of a stream, in order (``trackers``: of the same config, for the state)."""
    state = trackers.new_state()
    return [test.step(state, row16) for row16 in test.standardise(rows)]


@pytest.fixture(scope="module")
def step_test(config: TrackerConfig) -> StepTest:
    return StepTest(config)


def test_fit_records_each_features_range(config: TrackerConfig, digits: Digits) -> None:
    """The fit stores max - min of every feature over the reference: the test's unit for range shares."""
    assert np.array_equal(config.feature_range, digits.X_ref.max(axis=0) - digits.X_ref.min(axis=0))


def test_sign_steps_hit(step_test: StepTest, config: TrackerConfig, trackers: SessionTrackers,
                        digits: Digits) -> None:
    """A seed then ``seed + 1.6 * sign(g)`` clipped to the pixel box (JBDA on 0-16 pixels): the step hits,
    with the signs of a fixed vector or random ones, and with the box clipping a quarter of the moves."""
    rng = np.random.default_rng(3)
    for s in range(10):
        seed = digits.X_held[s]
        sign = np.sign(rng.normal(size=64))
        child = np.clip(seed + 1.6 * sign, 0.0, 16.0)
        assert _hits(step_test, trackers, np.stack([seed, child])) == [False, True]


def test_per_feature_steps_hit(step_test: StepTest, config: TrackerConfig, trackers: SessionTrackers,
                               digits: Digits) -> None:
    """A step of one share of each feature's range (an attacker scaling lam per feature) hits too, and so
    does a step of one sign on every feature."""
    seed = digits.X_held[0]
    child = seed - 0.1 * config.feature_range
    assert _hits(step_test, trackers, np.stack([seed, child])) == [False, True]


def test_benign_edits_and_fresh_rows_do_not_hit(step_test: StepTest, config: TrackerConfig,
                                                trackers: SessionTrackers, digits: Digits) -> None:
    """Held-out digits in order, each followed by edits of one to three pixels by varied amounts, by a retry
    and by noise of varied size on every pixel: no hit in 2,000 queries."""
    rng = np.random.default_rng(5)
    rows = []
    for x in digits.X_held[:400]:
        rows.append(x)
        edit = x.copy()
        cols = rng.choice(64, size=int(rng.integers(1, 4)), replace=False)
        edit[cols] = np.clip(edit[cols] + rng.uniform(-3, 3, size=cols.size), 0, 16)
        rows += [edit, edit.copy(), np.clip(x + rng.normal(0, 1.0, 64), 0, 16), np.round(x + rng.normal(0, 1, 64))]
    assert not any(_hits(step_test, trackers, np.array(rows)))


def test_flag_flips_do_not_hit(trackers: SessionTrackers) -> None:
    """Rows of binary flags differing on many of them move each by its whole range: a categorical edit, not a
    gradient step (every moved feature must move by less than half its range)."""
    d = 12
    cfg = TrackerConfig.default(d)
    cfg = dataclasses.replace(cfg, feature_range=np.ones(d))
    test = StepTest(cfg)
    rng = np.random.default_rng(0)
    flags = rng.integers(0, 2, size=(200, d)).astype(np.float64)
    assert not any(_hits(test, SessionTrackers(cfg, salt=SALT), flags))


def test_integer_codes_one_level_apart_do_not_hit() -> None:
    """Integer-coded records (ten features of 2-4 levels) differ by one level on many features, all by the same
    amount: a move of half a feature's range or more is a categorical edit and never counts as an equal move,
    so the four-level features alone (two) are too few (the detection matrix's coarse-hgb model flagged most of
    its benign sessions while such moves could count)."""
    levels = np.array([4, 4, 3, 3, 3, 2, 2, 2, 2, 2])
    cfg = dataclasses.replace(TrackerConfig.default(10), feature_range=(levels - 1).astype(np.float64))
    test = StepTest(cfg)
    rng = np.random.default_rng(1)
    codes = rng.integers(0, levels, size=(2000, 10)).astype(np.float64)
    assert not any(_hits(test, SessionTrackers(cfg, salt=SALT), codes))
    step = np.clip(codes[:1] + 0.1 * (levels - 1) * np.sign(rng.normal(size=10)), 0, levels - 1)
    assert _hits(test, SessionTrackers(cfg, salt=SALT), np.concatenate([codes[:1], step])) == [False, True]


def test_off_without_ranges_or_with_few_features(trackers: SessionTrackers) -> None:
    """A config without reference ranges (the default one, or a profile fitted before them) or with fewer
    than five features does not run the test."""
    assert not StepTest(TrackerConfig.default(64)).active
    small = TrackerConfig.default(4)
    assert not StepTest(dataclasses.replace(small, feature_range=np.ones(4))).active


def test_a_stream_of_steps_blocks_within_twenty(trackers: SessionTrackers, digits: Digits) -> None:
    """Through the whole engine: ten seeds and their sign steps reach the block level of ``session.neighbors``
    (0.95) before the twentieth query, and ten fresh held-out rows instead of the steps stay at 0."""
    rng = np.random.default_rng(11)
    seeds = digits.X_held[:10]
    children = np.clip(seeds + 1.6 * np.sign(rng.normal(size=(10, 64))), 0, 16)
    for stream, blocked in ((np.concatenate([seeds, children]), True),
                            (digits.X_held[:20], False)):
        state, scores = trackers.new_state(), {}
        for i, x in enumerate(stream):
            state, scores = trackers.update(state, x[None], digits.model.predict(x[None]), None, float(i))
        assert (scores["session.neighbors"] >= 0.95) is blocked
