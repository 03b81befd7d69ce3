"""RowBatcher: concurrent requests' rows are scored in one ``Profile.score`` call, with the same results."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from detectors import Profile, load_profiles
from guard_agent.scoring import RowBatcher
from tests.conftest import DigitsData


class CountingProfile:
    """A real fitted profile that counts the rows of each ``score`` call (to see the batching happen)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.calls: list[int] = []

    def score(self, X: np.ndarray) -> Mapping[str, np.ndarray]:
        self.calls.append(int(np.shape(X)[0]))
        return self.profile.score(X)


@pytest.fixture(scope="module")
def profile(digits_profile: str) -> Profile:
    return load_profiles(digits_profile)[""]


def _alone(profile: Profile, rows: np.ndarray) -> dict[str, float]:
    return {name: float(v.max()) for name, v in profile.score(rows).items()}


class TestRowBatcher:
    async def test_concurrent_requests_share_one_call_and_keep_their_scores(self, profile: Profile,
                                                                            digits: DigitsData) -> None:
        """20 requests (1 to 3 rows, held-out and noise rows) reaching scoring in one loop turn: one call, and
        each request's scores equal to scoring it alone (to 1e-9)."""
        rng = np.random.default_rng(3)
        requests = [digits.X_test[i : i + 1 + i % 3] for i in range(0, 40, 2)]
        requests += [rng.uniform(0, 16, size=(2, 64))]
        counting = CountingProfile(profile)
        batcher = RowBatcher()
        got = await asyncio.gather(*(batcher.score(counting, r) for r in requests))
        assert counting.calls == [sum(len(r) for r in requests)]
        for rows, scores in zip(requests, got, strict=True):
            want = _alone(profile, rows)
            assert scores.keys() == want.keys()
            assert all(abs(scores[k] - want[k]) <= 1e-9 for k in want), (scores, want)

    async def test_a_bad_request_fails_alone(self, profile: Profile, digits: DigitsData) -> None:
        """A request the profile refuses (NaN) gets its own error; the others of its batch get their scores."""
        bad = digits.X_test[:1].copy()
        bad[0, 5] = np.nan
        batcher = RowBatcher()
        good1, failed, good2 = await asyncio.gather(batcher.score(profile, digits.X_test[:1]),
                                                    batcher.score(profile, bad),
                                                    batcher.score(profile, digits.X_test[1:2]),
                                                    return_exceptions=True)
        assert isinstance(failed, ValueError)
        assert good1 == _alone(profile, digits.X_test[:1])
        assert good2 == _alone(profile, digits.X_test[1:2])

    async def test_calls_are_bounded_in_rows(self, profile: Profile, digits: DigitsData) -> None:
        """No call scores more than ``max_rows`` rows; a request of ``max_rows`` rows or more is scored alone."""
        counting = CountingProfile(profile)
        batcher = RowBatcher(max_rows=8)
        await asyncio.gather(*(batcher.score(counting, digits.X_test[i : i + 3]) for i in range(0, 30, 3)),
                             batcher.score(counting, digits.X_test[:9]))
        assert max(counting.calls) <= 9 and sorted(counting.calls)[-1] == 9
        assert sum(counting.calls) == 39 and all(c <= 8 for c in counting.calls if c != 9)


class TestTrackerHashes:
    async def test_concurrent_requests_hash_as_alone(self, profile: Profile, digits: DigitsData) -> None:
        """The trackers' request hashes of concurrent requests (1 to 3 rows) come from one call and equal each
        request's own; a request above max_rows_tracked (subsampled) is hashed alone."""
        from detectors.trackers import SessionTrackers, TrackerConfig
        from guard_agent.batching import TurnBatcher
        from guard_agent.tracking import _rows_of

        engine = SessionTrackers(TrackerConfig.from_parts(*profile.components["trackers"]), salt=b"s" * 32)
        calls: list[int] = []

        def run(e: SessionTrackers, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            calls.append(rows.shape[0])
            return e.request_hashes(rows)

        batcher = TurnBatcher(run, _rows_of, max_rows=lambda e: e.config.max_rows_tracked)
        big = np.tile(digits.X_test[:40], (2, 1))  # 80 rows > 64 tracked
        requests = [digits.X_test[i : i + 1 + i % 3] for i in range(0, 30, 3)] + [big]
        got = await asyncio.gather(*(batcher(engine, r) for r in requests))
        assert sorted(calls) == [sum(len(r) for r in requests[:-1]), 80]
        for rows, hashes in zip(requests, got, strict=True):
            for mine, alone in zip(hashes, engine.request_hashes(rows), strict=True):
                assert np.array_equal(mine, alone)


class TestTurnQueue:
    async def test_one_turn_runs_once_per_key_in_order(self) -> None:
        """Items queued in one loop turn run in one call per key, in arrival order; each gets its own result."""
        from guard_agent.batching import TurnQueue

        calls: list[tuple[str, list[int]]] = []

        def run(key: str, items: list[int]) -> list[int]:
            calls.append((key, list(items)))
            return [i * 10 for i in items]

        queue: TurnQueue[str, int, int] = TurnQueue(run)
        got = await asyncio.gather(*(queue("ab"[i % 2], i) for i in range(6)))
        assert got == [0, 10, 20, 30, 40, 50]
        assert sorted(calls) == [("a", [0, 2, 4]), ("b", [1, 3, 5])]
        assert await queue("a", 7) == 70 and calls[-1] == ("a", [7])

    async def test_a_failing_call_runs_each_item_alone(self) -> None:
        """When the call over several items raises, each item runs alone and gets its own result or error."""
        from guard_agent.batching import TurnQueue

        def run(key: str, items: list[int]) -> list[int]:
            if any(i < 0 for i in items):
                raise ValueError(f"negative among {items}")
            return items

        queue: TurnQueue[str, int, int] = TurnQueue(run)
        got = await asyncio.gather(queue("k", 1), queue("k", -1), queue("k", 2), return_exceptions=True)
        assert got[0] == 1 and got[2] == 2
        assert isinstance(got[1], ValueError) and "[-1]" in str(got[1])


class TestTrackerUpdates:
    """``SessionTracking.update`` of concurrent requests: one ``update_many`` per turn, the results of going alone."""

    @staticmethod
    def _tracking(profile: Profile) -> Any:
        from detectors.trackers import TrackerConfig
        from guard_agent.tracking import SessionTracking

        config = TrackerConfig.from_parts(*profile.components["trackers"])
        return SessionTracking({"": config}, salt=b"s" * 32)

    async def _request(self, tracking: Any, session: str, record: Any, X: np.ndarray, model: Any,
                       now: float) -> Mapping[str, float]:
        from guard_agent.protocols import ParsedResponse

        scores = await tracking.peek(session, record, X, None, now)
        proba = model.predict_proba(X)
        answer = ParsedResponse(labels=np.argmax(proba, axis=1), probabilities=proba)
        result: Mapping[str, float] = await tracking.update(session, record, X, None, answer, now, scores)
        return result

    async def test_concurrent_requests_learn_as_sequential_ones(self, profile: Profile, digits: DigitsData) -> None:
        """Eight sessions, 30 rounds of one request each, all eight concurrent in every round, some rounds
        with two requests of one session (its second sees its first): the same scores and tracker states as
        the same requests one after the other; the updates of a round share calls (fewer calls than updates)."""
        from detectors.trackers import SessionTrackers
        from guard_agent.demo import DigitsModel
        from guard_agent.sessions.base import SessionRecord

        model = DigitsModel()
        rng = np.random.default_rng(12)
        together, alone = self._tracking(profile), self._tracking(profile)
        calls: list[int] = []
        engine = together.engine(None, 64)
        original = engine.update_many

        def counting(requests: Any) -> Any:
            calls.append(len(requests))
            return original(requests)

        engine.update_many = counting  # a spy on the real engine: counts, changes nothing
        rec_together = [SessionRecord(0.0, 0.0) for _ in range(8)]
        rec_alone = [SessionRecord(0.0, 0.0) for _ in range(8)]
        for step in range(30):
            now = float(step)
            plan = [(s, digits.X_test[rng.integers(len(digits.X_test), size=1 + (s == 7) * 2)]) for s in range(8)]
            if step % 5 == 0:
                plan.append((3, np.clip(plan[3][1] + 0.5, 0, 16)))  # a second request of session 3 this round
            got = await asyncio.gather(*(self._request(together, f"s{s}", rec_together[s], X, model, now)
                                         for s, X in plan))
            want = [await self._request(alone, f"s{s}", rec_alone[s], X, model, now) for s, X in plan]
            assert got == want, step
            for s in range(8):
                mine, theirs = rec_together[s].tracker_state, rec_alone[s].tracker_state
                assert mine.keys() == theirs.keys()
                eng: SessionTrackers = together.engine(None, 64)
                assert all(eng.encode(mine[k]) == eng.encode(theirs[k]) for k in mine), (step, s)
        assert sum(calls) == 30 * 8 + 6 and len(calls) < sum(calls) / 4

    async def test_a_bad_request_fails_alone(self, profile: Profile, digits: DigitsData) -> None:
        """A request whose rows the trackers refuse (NaN) gets its own error; the others of its turn learn."""
        from guard_agent.protocols import ParsedResponse
        from guard_agent.sessions.base import SessionRecord

        tracking = self._tracking(profile)
        bad = digits.X_test[:1].copy()
        bad[0, 2] = np.nan
        records = [SessionRecord(0.0, 0.0) for _ in range(3)]
        answer = ParsedResponse(labels=np.array([1]), probabilities=None)
        got = await asyncio.gather(*(tracking.update(f"s{i}", records[i], X, None, answer, 1.0, {})
                                     for i, X in enumerate((digits.X_test[:1], bad, digits.X_test[1:2]))),
                                   return_exceptions=True)
        assert isinstance(got[1], ValueError) and records[1].tracker_state is None
        assert isinstance(got[0], Mapping) and records[0].tracker_state is not None
        assert isinstance(got[2], Mapping) and records[2].tracker_state is not None


async def test_turn_queue_runs_the_items_of_cancelled_waiters() -> None:
    """An item whose waiter is cancelled before the turn ends still runs (a session still learns its query);
    the others get their results."""
    from guard_agent.batching import TurnQueue

    ran: list[int] = []

    def run(key: str, items: list[int]) -> list[int]:
        ran.extend(items)
        return items

    queue: TurnQueue[str, int, int] = TurnQueue(run)
    first = asyncio.ensure_future(queue("k", 1))
    second = asyncio.ensure_future(queue("k", 2))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second == 2
    assert ran == [1, 2] and first.cancelled()
