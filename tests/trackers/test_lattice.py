"""The lattice test (``detectors.trackers._lattice``): queries that leave the whole numbers of integer-coded data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from detectors.trackers import SessionTrackers, TrackerConfig, fit_tracker_config
from detectors.trackers._lattice import LatticeTest
from tests.trackers.conftest import SALT

LEVELS = np.array([4, 4, 3, 3, 3, 2, 2, 2, 2, 2])


@pytest.fixture(scope="module")
def coded() -> tuple[np.ndarray, np.ndarray]:
    """Ten correlated features binned into 2-4 levels (as the detection matrix's coarse-hgb data), carrying a
    class, plus one continuous feature: points between the codes' nodes lie on the reference manifold."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=1500, n_features=10, n_informative=5, n_redundant=2, n_classes=3,
                               n_clusters_per_class=1, random_state=0)
    codes = np.empty_like(X)
    for j, k in enumerate(LEVELS):
        codes[:, j] = np.searchsorted(np.quantile(X[:, j], np.linspace(0, 1, k + 1)[1:-1]), X[:, j])
    return np.column_stack([codes, np.random.default_rng(5).normal(size=1500)]), y


@pytest.fixture(scope="module")
def config(coded: tuple[np.ndarray, np.ndarray]) -> TrackerConfig:
    return fit_tracker_config(coded[0][:1000], coded[1][:1000], seed=0)


def test_fit_marks_the_integer_coded_features(config: TrackerConfig) -> None:
    """The ten coded features are marked; the continuous one is not, nor would a constant one be."""
    assert config.integer_features.tolist() == [1] * 10 + [0]
    parts = config.to_parts()
    assert TrackerConfig.from_parts(*parts).integer_features.tolist() == [1] * 10 + [0]


def test_a_profile_without_the_array_loads_with_the_test_off(config: TrackerConfig) -> None:
    """A profile fitted before the test existed has no ``integer_features``: it loads, and the test is off."""
    params, arrays = config.to_parts()
    old = TrackerConfig.from_parts(params, {k: v for k, v in arrays.items() if k != "integer_features"})
    assert old.integer_features.shape == (0,)
    assert not LatticeTest(old).active
    with pytest.raises(ValueError, match="integer_features"):
        dataclasses.replace(config, integer_features=np.full(11, 2))


def test_fractional_on_half_the_codes_fires(config: TrackerConfig, coded: tuple[np.ndarray, np.ndarray]) -> None:
    """Whole rows, and rows with one to three codes made fractional (a hand edit, another source's rounding on
    a feature or two) do not fire; rows fractional on half the codes or more do, and so do uniform draws over
    the box. Fewer than four coded features: off."""
    test = LatticeTest(config)
    rng = np.random.default_rng(6)
    rows = coded[0][1000:1200].copy()
    assert not any(test.off(rows))
    edited = rows.copy()
    for row in edited:
        cols = rng.choice(10, size=int(rng.integers(1, 4)), replace=False)
        row[cols] += rng.uniform(0.05, 0.95, size=cols.size)
    assert not any(test.off(edited))
    half = rows.copy()
    half[:, :5] += 0.3
    assert all(test.off(half))
    box = rng.uniform(0, LEVELS - 1, size=(50, 10))
    assert all(test.off(np.column_stack([box, rng.normal(size=50)])))
    three = dataclasses.replace(TrackerConfig.default(6), integer_features=np.array([1, 1, 1, 0, 0, 0]))
    assert not LatticeTest(three).active and not any(LatticeTest(three).off(np.full((2, 6), 0.5)))


def _first_half(trackers: SessionTrackers, rows: np.ndarray) -> int | None:
    """The query at which ``session.neighbors`` reaches 0.5 (answers all one class), None if never."""
    state = trackers.new_state()
    for i, row in enumerate(rows):
        state, scores = trackers.update(state, row[None], np.array([0]), None, float(i))
        if scores["session.neighbors"] >= 0.5:
            return i + 1
    return None


def test_a_search_between_lattice_nodes_is_seen_and_whole_edits_are_not(
        config: TrackerConfig, coded: tuple[np.ndarray, np.ndarray]) -> None:
    """Probes around a point between the lattice's nodes (a black-box search in continuous space, as Boundary's
    candidates are) raise ``session.neighbors`` to 0.5 within 15 queries, where without the test (a profile
    fitted before it) they never do in 40: the points are on the reference manifold. Whole-number edits of one
    record (a client trying the levels of a few features) score exactly as without the test."""
    rng = np.random.default_rng(7)
    start = coded[0][1300].copy()
    start[:10] += 0.4
    probes = np.repeat(start[None], 40, axis=0)
    probes[:, :10] += rng.normal(0.0, 0.02, size=(40, 10))
    found = _first_half(SessionTrackers(config, salt=SALT), probes)
    assert found is not None and found <= 15
    without = dataclasses.replace(config, integer_features=np.zeros(0))
    assert _first_half(SessionTrackers(without, salt=SALT), probes) is None
    record = coded[0][1301]
    edits = np.repeat(record[None], 40, axis=0)
    for edit in edits:
        cols = rng.choice(10, size=2, replace=False)
        edit[cols] = rng.integers(0, LEVELS[cols])
    with_test, without_test = SessionTrackers(config, salt=SALT), SessionTrackers(without, salt=SALT)
    a, b = with_test.new_state(), without_test.new_state()
    for i, edit in enumerate(edits):
        a, scores_a = with_test.update(a, edit[None], np.array([0]), None, float(i))
        b, scores_b = without_test.update(b, edit[None], np.array([0]), None, float(i))
        assert scores_a == scores_b
