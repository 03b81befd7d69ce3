"""``SessionTrackers.update_many``: several sessions' requests fed at once give each what ``update`` gives alone."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.trackers import SessionState, SessionTrackers, Update
from tests.trackers.conftest import Digits
from tests.trackers.streams import hsj_like, jbda_like


def _sessions(digits: Digits, rng: np.random.Generator, centre: np.ndarray) -> list[list[np.ndarray]]:
    """Eleven sessions of 60 requests: fresh rows, retries of a few rows, boundary searches, gradient steps,
    uniform noise, batches of 1 to 70 rows (70: sub-sampled), rows near the reference's centre (a ring's empty
    slots, all zeros, are the centre: they would be those rows' nearest neighbours), so every tracker has
    something to see."""
    held = digits.X_held
    out: list[list[np.ndarray]] = []
    out.append([held[rng.integers(len(held), size=1)] for _ in range(60)])
    few = held[rng.integers(len(held), size=3)]
    out.append([few[rng.integers(3, size=1)] for _ in range(60)])  # exact repeats
    out.append([r[None] for r in hsj_like(held[5], rng, 60, hi=16.0)])
    out.append([r[None] for r in jbda_like(held[:4], rng, 60, lam=1.5, hi=16.0)])
    out.append([rng.uniform(0, 16, size=(1, 64)) for _ in range(60)])
    out.append([held[rng.integers(len(held), size=int(rng.choice([1, 2, 5, 70])))] for _ in range(60)])
    for s in range(3):
        base = held[10 + s]
        out.append([np.clip(base + rng.normal(0, 0.5, size=(1, 64)), 0, 16) for _ in range(60)])
    out.append([centre + rng.normal(0, 0.05, size=(1, 64)) for _ in range(60)])
    # gradient steps from the centre (a hit against an empty slot would count), then far and central rows
    # in turn (an empty slot would be a central row's nearest neighbour)
    edge = [centre + 1.5 * np.sign(rng.normal(size=(1, 64))) for _ in range(8)]
    edge += [rng.uniform(0, 16, size=(1, 64)) if k % 2 else centre + rng.normal(0, 0.05, size=(1, 64))
             for k in range(52)]
    out.append(edge)
    return out



def _results(trackers: SessionTrackers,
             outs: list[tuple[SessionState, dict[str, float]]]) -> list[tuple[bytes, dict[str, float]]]:
    return [(trackers.encode(state), scores) for state, scores in outs]


@pytest.mark.parametrize("group", [2, 5, 11])
def test_sessions_fed_together_end_as_fed_alone(trackers: SessionTrackers, digits: Digits, group: int) -> None:
    """Eleven sessions' streams fed ``group`` sessions at a time (one request of each per call; session s starts at
    step 2 s, so rings of every fill meet in one call) end with the same encoded states and the same scores
    after every request as fed one request at a time; the streams reach every tracker."""
    sessions = _sessions(digits, np.random.default_rng(8), trackers.config.center)
    alone = [trackers.new_state() for _ in sessions]
    together = [trackers.new_state() for _ in sessions]
    seen_risk = 0.0
    for step in range(80):
        now = float(step)
        requests = []
        for s, stream in enumerate(sessions):
            if not 0 <= step - 2 * s < len(stream):
                requests.append(Update(together[s], digits.X_held[:0], None, None, now))  # no rows yet
                alone[s], _ = trackers.update(alone[s], digits.X_held[:0], None, None, now)
                continue
            X = stream[step - 2 * s]
            proba = digits.model.predict_proba(X)
            requests.append(Update(together[s], X, None, proba, now, 0.9 if s % 3 == 0 else 0.1))
            alone[s], want = trackers.update(alone[s], X, None, proba, now,
                                            global_fingerprint=0.9 if s % 3 == 0 else 0.1)
            seen_risk = max(seen_risk, want["session.risk"])
        for first in range(0, len(requests), group):
            part = requests[first : first + group]
            outs = trackers.update_many(part)
            for k, (state, scores) in enumerate(outs):
                s = first + k
                together[s] = state
                assert scores == trackers.peek(alone[s], now), (step, s)
        assert [trackers.encode(st) for st in together] == [trackers.encode(st) for st in alone], step
    assert seen_risk >= 0.5


def test_a_request_fed_twice_in_one_call_starts_from_the_state_it_names(trackers: SessionTrackers,
                                                                       digits: Digits) -> None:
    """Two requests naming one state do not see each other (the caller orders a session's requests): each
    result is that of ``update`` from that state, and the state itself is not modified."""
    state, _ = trackers.update(trackers.new_state(), digits.X_held[:3], None, None, 0.0)
    before = trackers.encode(state)
    a, b = digits.X_held[3:4], digits.X_held[4:5]
    outs = trackers.update_many([Update(state, a, None, None, 1.0), Update(state, b, None, None, 1.0)])
    assert _results(trackers, outs) == _results(trackers, [trackers.update(state, a, None, None, 1.0),
                                                            trackers.update(state, b, None, None, 1.0)])
    assert trackers.encode(state) == before


def test_a_bad_request_fails_the_call(trackers: SessionTrackers, digits: Digits) -> None:
    """A request of the wrong width or with NaN makes the whole call raise (the caller retries one by one)."""
    good = Update(trackers.new_state(), digits.X_held[:1], None, None, 0.0)
    with pytest.raises(ValueError, match="shape"):
        trackers.update_many([good, Update(trackers.new_state(), digits.X_held[:1, :10], None, None, 0.0)])
    nan = digits.X_held[:1].copy()
    nan[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        trackers.update_many([good, Update(trackers.new_state(), nan, None, None, 0.0)])


def test_a_short_neighbour_ring_beside_a_fuller_one_has_no_neighbours_in_its_empty_slots(
        trackers: SessionTrackers, digits: Digits) -> None:
    """In one call with a session whose neighbour ring holds more queries, a session's empty ring slots (zeros: the
    reference centre) are no neighbours. The short session has neighbour evidence, its stored queries lie far from
    the centre and its query is the centre: its real neighbours are far, which lowers the evidence; an empty slot
    taken for a neighbour would be close and leave it as it was."""
    cfg = trackers.config
    rng = np.random.default_rng(5)
    centre = cfg.center[None, :]
    short, full = trackers.new_state(), trackers.new_state()
    for k in range(cfg.nn_k + 1):
        short, _ = trackers.update(short, rng.uniform(0, 16, size=(1, 64)), None, None, float(k))
    for k in range(3 * (cfg.nn_k + 1)):
        full, _ = trackers.update(full, digits.X_held[k : k + 1], None, None, float(k))
    assert short.n_nn < full.n_nn
    short.s_neighbors = 3.0
    now = float(3 * (cfg.nn_k + 1))
    alone, _ = trackers.update(short, centre, None, None, now)
    together = trackers.update_many([Update(full, digits.X_held[50:51], None, None, now),
                                     Update(short, centre, None, None, now)])
    assert alone.s_neighbors < 2.9  # the far neighbours lowered it (the decay over these seconds takes < 0.01)
    assert trackers.encode(together[1][0]) == trackers.encode(alone)
