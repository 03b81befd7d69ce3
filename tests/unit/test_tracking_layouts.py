"""SessionTracking keeps one tracker state per layout, so switching models cannot reset a session."""

from __future__ import annotations

import numpy as np
import pytest

from guard_agent.sessions.base import SessionRecord
from guard_agent.tracking import SessionTracking


class _Answer:
    labels = None
    probabilities = None


async def _query(tracking: SessionTracking, record: SessionRecord, x: np.ndarray, now: float) -> dict[str, float]:
    scores = await tracking.peek("s", record, x, None, now)
    return dict(await tracking.update("s", record, x, None, _Answer(), now, scores))


@pytest.mark.parametrize("widths", [(64, 16), (64, 100)])
async def test_alternating_widths_keep_both_histories(widths: tuple[int, int]) -> None:
    """A client alternating requests of two widths (two models) accumulates evidence on both: each state has
    seen all its queries, not only those since the last switch, and the two never mix (64 and 100 features
    have default configs of the same shape)."""
    tracking = SessionTracking({}, salt=b"layout-test-salt")
    record = SessionRecord(first_seen=0.0, last_seen=0.0)
    rng = np.random.default_rng(0)
    a, b = widths
    base_a, base_b = rng.uniform(0, 1, a), rng.uniform(0, 1, b)
    for i in range(20):
        await _query(tracking, record, (base_a + rng.normal(0, 1e-3, a))[None, :], float(i))
        await _query(tracking, record, (base_b + rng.normal(0, 1e-3, b))[None, :], float(i))
    states = dict(record.tracker_state)
    assert len(states) == 2
    assert sorted(s.n_queries for s in states.values()) == [20, 20]


async def test_encoding_round_trips_every_layout_and_builds_default_engines() -> None:
    """The Redis encoding carries every layout; a fresh process that has seen no request of those widths
    decodes it (building the default engines), and garbage is refused."""
    a = SessionTracking({}, salt=b"layout-test-salt")
    record = SessionRecord(first_seen=0.0, last_seen=0.0)
    for width in (64, 16, 8):
        await _query(a, record, np.linspace(0, 1, width)[None, :], 1.0)
    data = a.encode_state(record.tracker_state)
    assert data is not None
    b = SessionTracking({}, salt=b"layout-test-salt")
    decoded = b.decode_state(data)
    assert set(decoded) == set(record.tracker_state)
    assert b.encode_state(decoded) == data
    with pytest.raises(ValueError, match="truncated"):
        b.decode_state(data[:-5])
    with pytest.raises(ValueError, match="version"):
        b.decode_state(b"\x01" + data[1:])


async def test_layouts_per_session_are_bounded() -> None:
    """A client sending many widths keeps at most 4 states; the oldest goes first."""
    tracking = SessionTracking({}, salt=b"layout-test-salt")
    record = SessionRecord(first_seen=0.0, last_seen=0.0)
    for width in range(2, 9):
        await _query(tracking, record, np.ones((1, width)), 1.0)
    assert len(record.tracker_state) == 4
    assert tracking.engine(None, 8).config.layout_id in record.tracker_state


def test_global_index_settings_reach_the_index() -> None:
    """GUARD_GLOBAL_* set the index's look-back, half count and size; zero or negative values are refused."""
    from guard_agent.app import build_state
    from guard_agent.events import CallbackSink
    from guard_agent.settings import ConfigError, load_settings

    settings = load_settings(env={"GUARD_GLOBAL_WINDOW": "60", "GUARD_GLOBAL_HALF_COUNT": "3",
                                  "GUARD_GLOBAL_MAX_ENTRIES": "1000", "GUARD_HMAC_KEY": "k" * 32})
    state = build_state(settings, sink=CallbackSink(lambda _: None))
    index = state.trackers.global_index  # type: ignore[attr-defined]
    assert (index.window_s, index.m_half, index.max_entries) == (60.0, 3.0, 1000)
    with pytest.raises(ConfigError, match="global_window"):
        load_settings(env={"GUARD_GLOBAL_WINDOW": "0"})


async def test_refused_requests_leave_nothing_behind() -> None:
    """peek keeps the request's hashes for its update, but holds the features only weakly: when a request is
    refused (update never runs) and its array goes, so does the entry."""
    import gc

    tracking = SessionTracking({}, salt=b"layout-test-salt")
    record = SessionRecord(first_seen=0.0, last_seen=0.0)
    for i in range(50):
        x = np.random.default_rng(i).uniform(0, 1, (512, 64))
        await tracking.peek("s", record, x, None, float(i))
        del x
    gc.collect()
    assert tracking._pending == {}


async def test_large_batches_cost_at_most_the_tracked_rows() -> None:
    """A 1,000-row request feeds at most max_rows_tracked rows to the global index (a salted choice), so a
    big batch cannot make peek proportionally expensive; update still counts every row."""
    tracking = SessionTracking({}, salt=b"layout-test-salt")
    record = SessionRecord(first_seen=0.0, last_seen=0.0)
    x = np.random.default_rng(0).uniform(0, 1, (1000, 64))
    await tracking.peek("s", record, x, None, 1.0)
    limit = tracking.engine(None, 64).config.max_rows_tracked
    assert 0 < len(tracking.global_index) <= limit
    await tracking.update("s", record, x, None, _Answer(), 1.0, {})
    (state,) = record.tracker_state.values()
    assert state.n_queries == 1000


async def test_cycling_refused_widths_does_not_rebuild_engines() -> None:
    """Once the default-engine cache is full, requests of new widths (which the model never answered) get
    zero session scores instead of evicting and building an engine each; an answered width still gets one."""
    tracking = SessionTracking({}, salt=b"layout-test-salt")
    record = SessionRecord(first_seen=0.0, last_seen=0.0)
    for width in range(10, 18):  # fills the cache (8 engines)
        await tracking.peek("s", record, np.ones((1, width)), None, 1.0)
    built = dict(tracking._defaults)
    for width in range(100, 140):
        scores = await tracking.peek("s", record, np.ones((1, width)), None, 2.0)
        assert set(scores.values()) == {0.0}
    assert tracking._defaults == built
    x = np.ones((1, 64))
    await tracking.update("s", record, x, None, _Answer(), 3.0, {})  # the model answered width 64
    assert tracking.existing_engine(None, 64) is not None
