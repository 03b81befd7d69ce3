"""RowBatcher: concurrent requests' rows are scored in one ``Profile.score`` call, with the same results."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

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
