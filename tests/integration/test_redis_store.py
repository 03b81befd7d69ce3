"""The Redis session store and global fingerprint index against real Redis servers.

Shared-state tests use the Redis on 127.0.0.1:6379 under a unique key prefix (deleted afterwards; the
server is never flushed or stopped). Outage tests start their own ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.trackers import GlobalFingerprintIndex
from guard_agent.events import CallbackSink, EventLogger
from guard_agent.metrics import Metrics
from guard_agent.ratelimit import take
from guard_agent.sessions.factory import make_global_observer, make_session_store, split_redis_url
from guard_agent.sessions.memory import MemorySessionStore
from guard_agent.sessions.redis.global_index import RedisGlobalIndex
from guard_agent.sessions.redis.store import RedisSessionStore
from guard_agent.settings import ConfigError, Settings
from guard_agent.tracking import SessionTracking
from tests._support.latency import DelayedReplies
from tests._support.redis import RedisServer, keys_under, redis_cmd
from tests._support.waiting import wait_for

pytestmark = pytest.mark.redis

SHARED_URL = "redis://127.0.0.1:6379/0"
SALT = b"test-hmac-key"


@dataclass
class Replica:
    """One guard process's view: its store, trackers, metrics and operational log."""

    store: RedisSessionStore
    tracking: SessionTracking
    metrics: Metrics
    index: RedisGlobalIndex
    logs: list[bytes] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


def make_replica(url: str, prefix: str, *, budget_ms: int = 50, ttl: float = 3600.0, **kw: Any) -> Replica:
    logs: list[bytes] = []
    metrics = Metrics()
    events = EventLogger(CallbackSink(logs.append))
    tracking = SessionTracking({}, salt=SALT)
    settings = Settings(redis_url=f"{url}?key_prefix={prefix}&budget_ms={budget_ms}", hmac_key="k", session_ttl=ttl)
    store = make_session_store(settings, metrics=metrics, events=events, tracking=tracking)
    assert isinstance(store, RedisSessionStore)
    for k, v in kw.items():
        setattr(store, k, v)
    index = make_global_observer(settings, metrics=metrics, events=events, tracking=tracking)
    assert isinstance(index, RedisGlobalIndex)
    return Replica(store, tracking, metrics, index, logs)


@pytest.fixture
async def replicas(redis_prefix: str) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two replicas (separate pools, metrics, trackers) sharing one session namespace on the shared Redis."""
    a, b = make_replica(SHARED_URL, redis_prefix), make_replica(SHARED_URL, redis_prefix)
    yield a, b
    await a.store.aclose()
    await b.store.aclose()


class _Answer:
    """What the trackers read from a model answer."""

    def __init__(self, label: int) -> None:
        self.labels = np.array([label])
        self.probabilities = np.eye(10)[[label]] * 0.9 + 0.01


async def serve(r: Replica, session: str, x: np.ndarray, now: float, *, burst: float = 1e9,
                block: str | None = None) -> tuple[bool, dict[str, float]]:
    """One request as the proxy runs it: get, peek, take, maybe block, update, put."""
    record = await r.store.get(session, now)
    scores = dict(await r.tracking.peek(session, record, x, None, now))
    record.bucket, allowed, _ = take(record.bucket, now, rate=1e-6, burst=burst)
    if block is not None and record.blocked(now) is None:
        record.blocked_until, record.blocked_rule = now + 300, block
    record.queries += 1
    if allowed and record.blocked(now) is None:
        record.scores = dict(await r.tracking.update(session, record, x, None, _Answer(int(x.sum()) % 10), now,
                                                     scores))
    await r.store.put(session, record, now)
    return allowed, scores


def digits_like(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    return rng.integers(0, 17, size=(n, 64)).astype(np.float64)


def near(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate as a black-box attack sends it: two pixels of ``base`` nudged by one step."""
    x = np.array(base, dtype=np.float64).reshape(1, -1)
    x[0, rng.integers(0, x.shape[1], 2)] += 1.0
    return x


# ---- the URL contract ---------------------------------------------------------------------------------
class TestUrl:
    def test_prefix_and_budget_are_read_and_stripped(self) -> None:
        """key_prefix and budget_ms come out of the URL; other query parameters stay for redis-py."""
        url, prefix, budget = split_redis_url("redis://h:6379/2?key_prefix=m1:&budget_ms=30&protocol=3")
        assert (url, prefix, budget) == ("redis://h:6379/2?protocol=3", "m1:", 0.03)

    def test_defaults_and_bad_budget(self) -> None:
        """Defaults are the documented ones; a nonsense budget is a config error, not a crash later."""
        assert split_redis_url("redis://h/0")[1:] == ("inference-guard:", 0.05)
        with pytest.raises(ConfigError, match="budget_ms"):
            split_redis_url("redis://h/0?budget_ms=soon")

    def test_memory_without_redis_and_hmac_required_with_it(self) -> None:
        """No redis_url gives the memory store; a redis_url without an HMAC key is refused."""
        m, ev = Metrics(), EventLogger(CallbackSink(lambda _: None))
        tracking = SessionTracking({}, salt=SALT)
        assert isinstance(make_session_store(Settings(), metrics=m, events=ev, tracking=tracking),
                          MemorySessionStore)
        assert make_global_observer(Settings(), metrics=m, events=ev, tracking=tracking) is None
        with pytest.raises(ConfigError, match="HMAC"):
            make_session_store(Settings(redis_url=SHARED_URL), metrics=m, events=ev, tracking=tracking)


# ---- shared state --------------------------------------------------------------------------------------
class TestSharedSessions:
    async def test_record_round_trips_between_replicas(self, replicas: tuple[Replica, Replica]) -> None:
        """Everything replica A stores (counts, bucket, block, tracker state, scores) is what B reads."""
        a, b = replicas
        rng, now = np.random.default_rng(0), time.time()
        for i in range(3):
            await serve(a, "s1", digits_like(rng), now + i, burst=10, block="r-1" if i == 2 else None)
        mine = a.store.peek("s1")
        theirs = await b.store.get("s1", now + 3)
        assert mine is not None
        assert theirs.queries == 3 and theirs.first_seen == pytest.approx(now)
        assert theirs.bucket is not None and theirs.bucket.tokens == pytest.approx(7.0)
        assert theirs.blocked(now + 3) == "r-1" and theirs.blocked_until == pytest.approx(now + 302)
        assert theirs.scores == pytest.approx(mine.scores) and theirs.scores
        x = digits_like(rng)
        assert await b.tracking.peek("s1", theirs, x, None, now + 3) == await a.tracking.peek("s1", mine, x, None,
                                                                                          now + 3)
        assert b.tracking.encode_state(theirs.tracker_state) == a.tracking.encode_state(mine.tracker_state)

    async def test_alternating_replicas_accumulate_one_session(self, replicas: tuple[Replica, Replica]) -> None:
        """An attacker alternating between replicas builds one session: counts and tracker history add up."""
        a, b = replicas
        rng, now = np.random.default_rng(1), time.time()
        base = digits_like(rng)
        for i in range(20):
            await serve((a, b)[i % 2], "s2", near(base, rng), now + i)
        record = await a.store.get("s2", now + 21)
        assert record.queries == 20
        (state,) = record.tracker_state.values()
        assert state.n_queries == 20  # each replica alone would have seen 10

    async def test_concurrent_requests_merge_counts_and_bucket(self, replicas: tuple[Replica, Replica]) -> None:
        """Two replicas reading the same state and writing after each other lose no query and no token."""
        a, b = replicas
        now = time.time()
        ra, rb = await a.store.get("s3", now), await b.store.get("s3", now)
        for r in (ra, rb):
            r.bucket, allowed, _ = take(r.bucket, now, rate=1e-9, burst=5)
            assert allowed
            r.queries += 1
        await a.store.put("s3", ra, now)
        await b.store.put("s3", rb, now)
        ra, rb = await a.store.get("s3", now), await b.store.get("s3", now)
        for r in (ra, rb):
            r.bucket, _, _ = take(r.bucket, now, rate=1e-9, burst=5)
            r.queries += 1
        await b.store.put("s3", rb, now)
        await a.store.put("s3", ra, now)
        final = await a.store.get("s3", now)
        assert final.queries == 4
        assert final.bucket is not None and final.bucket.tokens == pytest.approx(1.0)

    async def test_token_bucket_holds_across_replicas(self, replicas: tuple[Replica, Replica]) -> None:
        """A burst of 5 is 5 requests for the session, not 5 per replica."""
        a, b = replicas
        now = time.time()
        allowed = [(await serve((a, b)[i % 2], "s4", np.zeros((1, 64)), now + i * 1e-3, burst=5))[0]
                   for i in range(12)]
        assert allowed == [True] * 5 + [False] * 7

    async def test_block_by_one_is_enforced_by_the_other(self, replicas: tuple[Replica, Replica]) -> None:
        """A block set by A is seen by B, and B writing a record it read before the block does not undo it."""
        a, b = replicas
        now = time.time()
        stale = await b.store.get("s5", now)
        await serve(a, "s5", np.zeros((1, 64)), now, block="extraction")
        stale.queries += 1
        await b.store.put("s5", stale, now + 0.5)
        seen = await b.store.get("s5", now + 1)
        assert seen.blocked(now + 1) == "extraction" and seen.queries == 2

    async def test_resent_write_is_applied_once(self, replicas: tuple[Replica, Replica]) -> None:
        """The same write sent twice (redis-py retrying on a dropped connection, a reconcile after a put
        whose outcome was unknown) adds its queries and spends its tokens once; a resend that carries more
        (the record moved on meanwhile) adds only the difference."""
        a, b = replicas
        now = time.time()
        await serve(a, "twice", np.zeros((1, 64)), now, burst=10)
        record = await a.store.get("twice", now + 1)
        record.bucket, _, _ = take(record.bucket, now + 1, rate=1e-6, burst=10)
        record.queries += 1
        args, _ = a.store._changes(record, now + 1)

        async def send(args: list[Any]) -> None:
            await a.store._script(a.store.link.client, "put")(keys=a.store.keys("twice"), args=args)

        await send(args)
        await send(args)
        seen = await b.store.get("twice", now + 1)
        assert seen.queries == 2 and seen.bucket is not None and seen.bucket.tokens == pytest.approx(8, abs=1e-3)
        record.bucket, _, _ = take(record.bucket, now + 1, rate=1e-6, burst=10)
        record.queries += 1  # still unacknowledged: the next send carries both queries of this chain
        await send(a.store._changes(record, now + 1)[0])
        seen = await b.store.get("twice", now + 1)
        assert seen.queries == 3 and seen.bucket is not None and seen.bucket.tokens == pytest.approx(7, abs=1e-3)
        await serve(b, "twice", np.zeros((1, 64)), now + 2, burst=10)  # a new chain is counted as usual
        assert (await a.store.get("twice", now + 3)).queries == 4

    async def test_older_write_of_a_chain_arriving_last_changes_nothing(self,
                                                                     replicas: tuple[Replica, Replica]) -> None:
        """Two writes of one chain reach Redis in the reverse order (the first one's packet was retransmitted,
        or two requests sharing the local copy wrote on two pooled connections): the older one, whose deltas
        the newer one already carries, gives back no token."""
        a, b = replicas
        now = time.time()
        await serve(a, "order", np.zeros((1, 64)), now, burst=10)
        record = await a.store.get("order", now + 1)
        sends = []
        for _ in range(2):
            record.bucket, _, _ = take(record.bucket, now + 1, rate=1e-6, burst=10)
            record.queries += 1
            sends.append(a.store._changes(record, now + 1)[0])
        for args in reversed(sends):
            await a.store._script(a.store.link.client, "put")(keys=a.store.keys("order"), args=args)
        seen = await b.store.get("order", now + 1)
        assert seen.queries == 3 and seen.bucket is not None and seen.bucket.tokens == pytest.approx(7, abs=1e-3)

    async def test_fetch_reads_without_creating(self, replicas: tuple[Replica, Replica], redis_prefix: str) -> None:
        """The admin read shows another replica's session and creates nothing for an unknown one."""
        a, b = replicas
        now = time.time()
        await serve(a, "s11", np.zeros((1, 64)), now, block="manual")
        shown = await b.store.fetch("s11", now + 1)
        assert shown is not None and shown.queries == 1 and shown.blocked_rule == "manual"
        assert await b.store.fetch("nobody", now + 1) is None
        assert keys_under(6379, redis_prefix + "s:") == [redis_prefix + "s:s11"]

    async def test_unblock_is_not_undone_by_a_stale_writer(self, replicas: tuple[Replica, Replica]) -> None:
        """An operator unblock on A holds although B still writes a record read while blocked."""
        a, b = replicas
        now = time.time()
        await serve(a, "s6", np.zeros((1, 64)), now, block="extraction")
        stale = await b.store.get("s6", now + 1)
        assert stale.blocked(now + 1) == "extraction"
        assert await a.store.unblock("s6")
        stale.queries += 1
        await b.store.put("s6", stale, now + 2)
        after = await a.store.get("s6", now + 3)
        assert after.blocked(now + 3) is None and after.queries == 2
        assert not await a.store.unblock("s6")

    @pytest.mark.parametrize("op", ["unblock", "delete"])
    async def test_operator_action_is_not_undone_by_a_merge(self, replicas: tuple[Replica, Replica],
                                                            op: str) -> None:
        """A holds a blocked session that is dirty (a put fell back); the operator lifts the block (or resets
        the session) on B; A's merge when Redis answers again counts A's query but does not block again."""
        a, b = replicas
        now = time.time()
        await serve(a, "op", np.zeros((1, 64)), now, block="extraction")
        a.store.link.up = False  # an outage as the link sees it (no probe: the test reconciles)
        await serve(a, "op", np.zeros((1, 64)), now + 1)
        assert a.store.dirty() == 1
        assert await getattr(b.store, op)("op")
        a.store.link.up = True
        await a.store.reconcile()
        assert a.store.dirty() == 0
        seen = await b.store.get("op", now + 3)
        assert seen.blocked(now + 3) is None
        assert seen.queries == (2 if op == "unblock" else 1)  # a reset keeps only what came after it

    async def test_keys_have_prefix_and_ttl(self, redis_prefix: str) -> None:
        """Session keys live under the configured redis_prefix and expire after session_ttl."""
        r = make_replica(SHARED_URL, redis_prefix, ttl=120.0)
        try:
            await serve(r, "s7", np.zeros((1, 64)), time.time())
            assert keys_under(6379, redis_prefix + "s:") == [redis_prefix + "s:s7"]
            pttl = int(redis_cmd(6379, "PTTL", redis_prefix + "s:s7")[1:].split(b"\r")[0])
            assert 110_000 < pttl <= 120_000
        finally:
            await r.store.aclose()

    async def test_garbage_state_is_reset_and_counted(self, replicas: tuple[Replica, Replica],
                                                      redis_prefix: str) -> None:
        """Undecodable tracker bytes give a fresh tracker state (counted), never an error."""
        a, _ = replicas
        now = time.time()
        await serve(a, "s8", np.zeros((1, 64)), now)
        redis_cmd(6379, "HSET", redis_prefix + "s:s8", "t", "not a tracker state")
        record = await a.store.get("s8", now + 1)
        scores = await a.tracking.peek("s8", record, np.zeros((1, 64)), None, now + 1)
        assert scores["session.risk"] == 0.0 and record.queries == 1
        assert a.metric("inference_guard_redis_state_errors_total", kind="decode") == 1

    async def test_oversized_state_stays_local(self, redis_prefix: str) -> None:
        """A tracker state above max_state_bytes is not written to Redis (counted); counts still are."""
        r = make_replica(SHARED_URL, redis_prefix, max_state_bytes=100)
        try:
            now = time.time()
            await serve(r, "s9", np.zeros((1, 64)), now)
            assert b"-" not in redis_cmd(6379, "HEXISTS", redis_prefix + "s:s9", "t")[:1]
            assert redis_cmd(6379, "HEXISTS", redis_prefix + "s:s9", "t").startswith(b":0")
            assert redis_cmd(6379, "HGET", redis_prefix + "s:s9", "q").endswith(b"1\r\n")
            assert r.metric("inference_guard_redis_state_errors_total", kind="oversize") == 1
        finally:
            await r.store.aclose()

    async def test_delete_forgets_everywhere(self, replicas: tuple[Replica, Replica], redis_prefix: str) -> None:
        """An operator reset on A removes the shared record; B then starts the session afresh."""
        a, b = replicas
        now = time.time()
        await serve(b, "s10", np.zeros((1, 64)), now)
        assert await a.store.delete("s10")
        assert keys_under(6379, redis_prefix + "s:") == []
        assert (await b.store.get("s10", now + 1)).queries == 0  # B's local copy is not restored
        assert b.store.peek("s10") is not None and b.store.peek("s10").queries == 0

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(schedule=st.lists(st.tuples(st.integers(0, 1), st.booleans()), min_size=1, max_size=12))
    def test_any_interleaving_counts_every_query(self, redis_prefix: str, schedule: list[tuple[int, bool]]) -> None:
        """However two replicas interleave reads and writes, the stored count equals the queries written."""

        async def run() -> int:
            reps = [make_replica(SHARED_URL, redis_prefix), make_replica(SHARED_URL, redis_prefix)]
            session = uuid.uuid4().hex
            now = time.time()
            held: list[Any] = [None, None]
            written = 0
            for who, write in schedule:
                if held[who] is None:
                    held[who] = await reps[who].store.get(session, now)
                    held[who].queries += 1
                if write:
                    await reps[who].store.put(session, held[who], now)
                    held[who], written = None, written + 1
            final = await reps[0].store.get(session, now)
            for r in reps:
                await r.store.aclose()
            return final.queries - written

        assert asyncio.run(run()) == 0


# ---- the global index ------------------------------------------------------------------------------
class TestGlobalIndex:
    async def test_scores_equal_the_in_memory_index(self, replicas: tuple[Replica, Replica]) -> None:
        """Same traffic, same scores: the Redis index speaks on the scale of GlobalFingerprintIndex.observe, with
        near-duplicate clusters (answered with one class, or with two), exact repeats, densities, batches and
        entries outliving the window."""
        a, _ = replicas
        engine = a.tracking.engine(None, 64)
        reference = GlobalFingerprintIndex()
        rng, now = np.random.default_rng(3), time.time()
        bases = digits_like(rng, 3)
        sent: list[np.ndarray] = []
        got, want = [], []
        for i in range(90):
            if i % 9 == 4 and sent:
                x = sent[-1 - int(rng.integers(min(10, len(sent))))]  # an exact repeat within the window
            elif i % 11 == 5:
                x = np.vstack([near(bases[i % 3], rng), digits_like(rng)])  # a batch of two rows
            else:
                x = near(bases[i % 3], rng) if i % 4 else digits_like(rng)
            sent.append(x)
            fps, dg = engine.fingerprints(x), engine.row_keys(x)
            density = rng.choice([0.0, 0.0, 0.002, 0.05], size=fps.shape[0])
            t = now + 20.0 * i  # 1,800 s in all: entries created early age out of the 600 s window
            got.append(await a.index.observe(f"key-{i % 7}", fps, dg, t, density))
            want.append(reference.observe(f"key-{i % 7}", fps, dg, t, density))
            # clusters around bases 0 and 1 are answered with one class each; around base 2 with two
            answers = np.full(fps.shape[0], i % 3 if i % 3 < 2 else 2 + (i // 3) % 2)
            await a.index.learn(f"key-{i % 7}", fps, dg, answers, t)
            reference.learn(fps, answers, t)
        assert got == pytest.approx(want)
        assert max(got) >= 0.4  # the clusters answered with two classes count (in part: their answers' shares)
        assert len(set(got)) >= 10

        def answers(index: GlobalFingerprintIndex) -> list[tuple[int, float, float]]:
            kept = index._label >= 0
            return sorted(zip(index._label[kept].tolist(), index._same[kept].tolist(), index._flips[kept].tolist(),
                              strict=True))

        assert answers(reference) == answers(a.index.local)
        assert all(got[i] == 0.0 for i in range(90) if i % 9 == 4)  # exact repeats score nothing

    async def test_spread_attack_is_seen_across_replicas(self, replicas: tuple[Replica, Replica]) -> None:
        """Near-duplicates sent under many keys to two replicas raise the global score on both."""
        a, b = replicas
        engine = a.tracking.engine(None, 64)
        rng, now = np.random.default_rng(4), time.time()
        base = digits_like(rng)[0]
        scores = {"a": [], "b": []}
        for i in range(20):
            r, name = (a, "a") if i % 2 == 0 else (b, "b")
            x = near(base, rng)
            fps, dg = engine.fingerprints(x), engine.row_keys(x)
            scores[name].append(await r.index.observe(f"sybil-{i}", fps, dg, now + i))
            await r.index.learn(f"sybil-{i}", fps, dg, np.array([i % 3 == 0]), now + i)  # straddles the boundary
        assert scores["b"][1] > 0  # B's second query matches what A saw (and was answered with two classes)
        assert scores["a"][-1] > 0.3 and scores["b"][-1] > 0.3
        benign = []
        for i in range(20):
            x = digits_like(rng)
            benign.append(await a.index.observe(f"user-{i}", engine.fingerprints(x), engine.row_keys(x), now + 30))
        assert max(benign) == 0.0

    async def test_a_cluster_answered_alike_never_counts(self, replicas: tuple[Replica, Replica],
                                                         redis_prefix: str) -> None:
        """40 keys on two replicas sending their own near-copies of one popular input, all answered with one
        class, score 0 on Redis; once a prober's copies were answered with the other class about as often as a
        boundary search gets it, a new key's copy scores high on the other replica (Redis, not its local
        mirror, knows the answers of both)."""
        a, b = replicas
        engine = a.tracking.engine(None, 64)
        rng, now = np.random.default_rng(8), time.time()
        base = digits_like(rng)[0]
        scores = []
        for i in range(40):
            r = a if i % 2 == 0 else b
            x = near(base, rng)
            fps, dg = engine.fingerprints(x), engine.row_keys(x)
            scores.append(await r.index.observe(f"user-{i}", fps, dg, now + i))
            await r.index.learn(f"user-{i}", fps, dg, np.array([4]), now + i)
        assert max(scores) == 0.0
        for j in range(14):
            x = near(base, rng)
            fps, dg = engine.fingerprints(x), engine.row_keys(x)
            await a.index.observe("prober", fps, dg, now + 50 + j / 100)
            await a.index.learn("prober", fps, dg, np.array([6]), now + 50 + j / 100)
        assert len(keys_under(6379, redis_prefix + "gl:")) >= 1
        x = near(base, rng)
        assert await b.index.observe("prober-2", engine.fingerprints(x), engine.row_keys(x), now + 51) >= 0.9

    async def test_large_batch_sends_at_most_max_rows(self, replicas: tuple[Replica, Replica],
                                                      redis_prefix: str) -> None:
        """A 100-row request puts only max_rows entries into Redis (one script stays short); the local
        index still sees every row."""
        a, _ = replicas
        engine = a.tracking.engine(None, 64)
        rows = digits_like(np.random.default_rng(7), 100)
        await a.index.observe("batch", engine.fingerprints(rows), engine.row_keys(rows), time.time())
        assert len(keys_under(6379, redis_prefix + "ge:")) == a.index.max_rows == 8
        assert len(a.index.local) == 100

    async def test_memory_is_bounded(self, redis_prefix: str) -> None:
        """Entries and exact-input digests stay within max_entries and each bucket within bucket_size, however
        much arrives."""
        r = make_replica(SHARED_URL, redis_prefix)
        r.index = RedisGlobalIndex(r.store.link, max_entries=50, bucket_size=3)
        try:
            engine = r.tracking.engine(None, 64)
            rng, now = np.random.default_rng(5), time.time()
            for i in range(30):
                x = digits_like(rng, 8)
                await r.index.observe(f"k{i}", engine.fingerprints(x), engine.row_keys(x), now)
            entries = keys_under(6379, redis_prefix + "ge:")
            assert 40 <= len(entries) <= 50
            for group in keys_under(6379, redis_prefix + "gb:"):
                raw = redis_cmd(6379, "HVALS", group)
                cells = [c for c in raw.split(b"\r\n") if c and not c.startswith((b"*", b"$"))]
                assert cells and all(len(c.split(b",")) <= 3 for c in cells)
            assert int(redis_cmd(6379, "TTL", entries[0])[1:].split(b"\r")[0]) <= 600
            slots = [k for k in keys_under(6379, redis_prefix + "gd:") if k[len(redis_prefix) + 3 :].isdigit()]
            assert 40 <= len(slots) <= 50  # the digest ring: 240 distinct inputs, 50 slots
            groups = keys_under(6379, redis_prefix + "gd:m:")
            fields = sum(int(redis_cmd(6379, "HLEN", g)[1:].split(b"\r")[0]) for g in groups)
            assert fields <= 50  # an overwritten slot takes its digest out of the lookup
        finally:
            await r.store.aclose()


# ---- outages (own redis-server) -----------------------------------------------------------------------


class TestOutage:
    async def test_down_falls_back_within_budget_then_reconciles(self, own_redis: RedisServer) -> None:
        """Redis killed mid-traffic: every call answers from local state within the budget, counted;
        restarted (empty): the link recovers and what A learnt meanwhile reaches B through Redis."""
        prefix = "out:"
        a, b = make_replica(own_redis.url, prefix), make_replica(own_redis.url, prefix)
        try:
            rng, now = np.random.default_rng(6), time.time()
            for i in range(5):  # A serves the last query before the crash, so A knows every query
                await serve((a, b)[i % 2], "att", digits_like(rng), now + i)
            own_redis.stop()
            slowest = 0.0
            for i in range(5, 15):
                t0 = time.perf_counter()
                await serve(a, "att", digits_like(rng), now + i, block="late-block" if i == 14 else None)
                slowest = max(slowest, time.perf_counter() - t0)
            assert slowest < 0.25  # budget + tracker work (+ a loaded CI machine); never the 0.25 s socket timeout
            assert a.metric("inference_guard_redis_up") == 0
            assert a.metric("inference_guard_redis_fallbacks_total", op="get", reason="down") >= 8
            assert a.store.dirty() == 1 and a.metric("inference_guard_redis_dirty_sessions") == 1
            assert any(b"redis unreachable" in line for line in a.logs)
            own_redis.start()
            # the session leaves the dirty set when its merge starts and is counted when the script answers
            assert await wait_for(lambda: a.store.link.up and a.store.dirty() == 0
                                  and a.metric("inference_guard_redis_reconciled_total", result="merged") >= 1,
                                  timeout=10, interval=0.02)
            assert a.metric("inference_guard_redis_reconnects_total") >= 1
            assert a.metric("inference_guard_redis_reconciled_total", result="merged") == 1
            assert a.metric("inference_guard_redis_dirty_sessions") == 0
            seen = await b.store.get("att", now + 20)
            assert seen.queries == 15 and seen.blocked(now + 20) == "late-block"
            assert any(b"redis reachable again" in line for line in a.logs)
        finally:
            await a.store.aclose()
            await b.store.aclose()

    async def test_reconcile_racing_requests_counts_once(self, own_redis: RedisServer) -> None:
        """Requests for a dirty session racing the background reconcile merge the outage's queries once."""
        a, b = make_replica(own_redis.url, "race:"), make_replica(own_redis.url, "race:")
        try:
            now = time.time()
            for i in range(2):
                await serve(a, "r", np.zeros((1, 64)), now + i)
            own_redis.stop()
            for i in range(2, 5):
                await serve(a, "r", np.zeros((1, 64)), now + i)
            own_redis.start()
            a.store.link.up = True  # what the probe does; its reconcile now races the requests below
            await asyncio.gather(a.store.reconcile(), a.store.get("r", now + 6), a.store.get("r", now + 6),
                                 a.store.reconcile())
            assert await wait_for(lambda: a.store.link.up and a.store.dirty() == 0, timeout=10, interval=0.02)
            assert (await b.store.get("r", now + 7)).queries == 5
        finally:
            await a.store.aclose()
            await b.store.aclose()

    async def test_put_that_ran_but_answered_late_is_merged_once(self, redis_prefix: str) -> None:
        """A put whose reply comes after the budget ran all the same; its reconcile must not count it twice.

        The delay is a relay between the replica and the shared Redis (``DelayedReplies``): Redis runs the
        script at once, only the answer is late, which is what a slow network or a busy server does.
        """
        async with DelayedReplies(6379) as relay:
            a = make_replica(f"redis://127.0.0.1:{relay.port}/0", redis_prefix)
            b = make_replica(SHARED_URL, redis_prefix)
            try:
                now = time.time()
                for i in range(2):
                    await serve(a, "late", np.zeros((1, 64)), now + i)
                record = await a.store.get("late", now + 2)
                record.queries += 1
                relay.delay = 0.3  # on the pooled connection the get used: the put runs, its answer is late
                await a.store.put("late", record, now + 2)
                assert a.metric("inference_guard_redis_fallbacks_total", op="put", reason="timeout") == 1
                assert a.store.dirty() == 1
                relay.delay = 0.0
                await asyncio.sleep(0.35)  # the late replies arrive on connections the client gave up
                await serve(a, "late", np.zeros((1, 64)), now + 3)  # merges the dirty record first
                assert a.store.dirty() == 0
                assert a.metric("inference_guard_redis_reconciled_total", result="merged") == 1
                assert (await b.store.get("late", now + 4)).queries == 4
            finally:
                await a.store.aclose()
                await b.store.aclose()

    async def test_change_made_while_a_merge_is_on_its_way_is_sent(self, redis_prefix: str) -> None:
        """A request holding the local copy (read during the outage) counts its query and sets a block while
        the reconcile of that copy waits for its answer: the merge's success must not mark those as synced.

        The reply of the merge is held back by a relay (``DelayedReplies``) so that the change lands in the
        window deterministically; in production the window is one Redis round trip per merge.
        """
        async with DelayedReplies(6379) as relay:
            a = make_replica(f"redis://127.0.0.1:{relay.port}/0", redis_prefix)
            b = make_replica(SHARED_URL, redis_prefix)
            try:
                now = time.time()
                await serve(a, "window", np.zeros((1, 64)), now)
                a.store.link.up = False  # an outage as the link sees it (no probe: this test plays the probe)
                await serve(a, "window", np.zeros((1, 64)), now + 1)
                held = await a.store.get("window", now + 2)  # the local copy, held by a request in flight
                assert a.store.dirty() == 1
                a.store.link.up = True
                relay.delay = 0.2
                merging = asyncio.create_task(a.store.reconcile())
                while a.store.dirty():  # the merge took the session: it was sent, its answer is on the way
                    await asyncio.sleep(0.005)
                held.queries += 1
                held.blocked_until, held.blocked_rule = now + 300, "late-block"
                await merging
                assert a.metric("inference_guard_redis_reconciled_total", result="merged") == 1
                relay.delay = 0.0
                await a.store.put("window", held, now + 2)
                seen = await b.store.get("window", now + 3)
                assert seen.queries == 3 and seen.blocked(now + 3) == "late-block"
            finally:
                await a.store.aclose()
                await b.store.aclose()

    async def test_failed_write_of_a_replaced_record_is_merged_once(self, redis_prefix: str) -> None:
        """Requests of one session read it from Redis; the first one's put fails, the others' succeed and their
        records become the local copy in turn: the reconcile still sends the first one's change. When that put
        did not run, its query is counted by the reconcile; when it ran and only its answer was late, it is
        counted once. Records whose writes succeeded are not sent again (20 of them: more than the records
        kept per session; 10 when the first put ran, which stays within the chains a session hash remembers)."""
        async with DelayedReplies(6379) as relay:
            a = make_replica(f"redis://127.0.0.1:{relay.port}/0", redis_prefix)
            b = make_replica(SHARED_URL, redis_prefix)
            try:
                now = time.time()
                for session, ran, n in (("unsent", False, 20), ("late", True, 10)):
                    await serve(a, session, np.zeros((1, 64)), now)
                    first = await a.store.get(session, now + 1)
                    others = [await a.store.get(session, now + 1) for _ in range(n)]
                    for r in (first, *others):
                        r.queries += 1
                    if ran:
                        relay.delay = 0.3  # the put runs, its answer comes after the budget
                    else:
                        a.store.link.up = False  # the put is not sent
                    await a.store.put(session, first, now + 1)
                    a.store.link.up, relay.delay = True, 0.0
                    await asyncio.sleep(0.35)  # late replies reach connections the client gave up
                    assert a.store.dirty() == 1
                    for r in others:
                        await a.store.put(session, r, now + 1)
                    assert a.store.peek(session) is others[-1]
                    sent = a.metric("inference_guard_redis_call_seconds_count", op="reconcile")
                    await a.store.reconcile()
                    assert a.store.dirty() == 0
                    assert a.metric("inference_guard_redis_call_seconds_count", op="reconcile") == sent + 2
                    assert (await b.store.get(session, now + 2)).queries == n + 2, session
            finally:
                await a.store.aclose()
                await b.store.aclose()

    async def test_restart_without_data_restores_known_sessions(self, own_redis: RedisServer) -> None:
        """Redis restarted empty between two requests: the replica restores the session it knew (counted)."""
        a = make_replica(own_redis.url, "rst:")
        try:
            now = time.time()
            for i in range(3):
                await serve(a, "known", np.zeros((1, 64)), now + i, block="b1" if i == 2 else None)
            own_redis.stop()
            own_redis.start()
            record = None
            for _ in range(50):  # the first call may meet a dead pooled connection and fall back
                record = await a.store.get("known", now + 4)
                if a.store.link.up and record.queries == 3:
                    break
                await asyncio.sleep(0.05)
            assert record is not None and record.queries == 3 and record.blocked(now + 4) == "b1"
            assert b":3" in redis_cmd(own_redis.port, "HGET", "rst:s:known", "q") or \
                redis_cmd(own_redis.port, "HGET", "rst:s:known", "q").endswith(b"3\r\n")
            restored = a.metric("inference_guard_redis_reconciled_total", result="restored")
            merged = a.metric("inference_guard_redis_reconciled_total", result="merged")
            assert restored + merged >= 1
        finally:
            await a.store.aclose()

    async def test_error_replies_fall_back_without_an_outage(self, own_redis: RedisServer) -> None:
        """A server refusing writes (OOM) costs no request: those writes stay local (one warning, counted)
        and are merged once it accepts writes again; reads keep coming from Redis meanwhile."""
        a = make_replica(own_redis.url, "oom:")
        try:
            now = time.time()
            await serve(a, "s", np.zeros((1, 64)), now)
            assert redis_cmd(own_redis.port, "CONFIG", "SET", "maxmemory", "1").startswith(b"+OK")
            for i in range(3):
                await serve(a, "s", np.zeros((1, 64)), now + 1 + i)
            assert a.metric("inference_guard_redis_fallbacks_total", op="put", reason="error") == 3
            assert a.store.link.up and a.metric("inference_guard_redis_fallbacks_total", op="get", reason="down") == 0
            assert sum(b"redis command failed" in line for line in a.logs) == 1
            assert redis_cmd(own_redis.port, "CONFIG", "SET", "maxmemory", "0").startswith(b"+OK")
            await serve(a, "s", np.zeros((1, 64)), now + 5)
            assert redis_cmd(own_redis.port, "HGET", "oom:s:s", "q").endswith(b"5\r\n")
        finally:
            await a.store.aclose()

    async def test_slow_redis_falls_back_within_budget(self, own_redis: RedisServer) -> None:
        """A paused Redis (slower than the budget): each call costs at most one budget, and after three in a
        row Redis counts as down (no more waiting) until it answers again."""
        a = make_replica(own_redis.url, "slow:", budget_ms=30)
        try:
            now = time.time()
            await serve(a, "s", np.zeros((1, 64)), now)
            assert redis_cmd(own_redis.port, "CLIENT", "PAUSE", "1000", "ALL").startswith(b"+OK")
            took = []
            for _ in range(2):
                t0 = time.perf_counter()
                record = await a.store.get("s", now + 1)
                await a.store.put("s", record, now + 1)
                took.append(time.perf_counter() - t0)
            # get+put slow (two budgets); then one slow call, then down: the counts below say which call waited,
            # the times only that none waited for a socket timeout (0.25 s), with room for a loaded CI machine
            assert 0.05 < took[0] < 0.25 and took[1] < 0.2
            fallbacks = {(op, reason): a.metric("inference_guard_redis_fallbacks_total", op=op, reason=reason)
                         for op in ("get", "put", "reconcile") for reason in ("timeout", "down")}
            assert fallbacks == {("get", "timeout"): 1, ("put", "timeout"): 1, ("reconcile", "timeout"): 1,
                                 ("get", "down"): 1, ("put", "down"): 1, ("reconcile", "down"): 0}
            assert a.metric("inference_guard_redis_up") == 0
            assert record.queries == 1  # the local mirror still knew the session
            assert await wait_for(lambda: a.store.link.up, timeout=10, interval=0.02)
            assert (await a.store.get("s", now + 2)).queries == 1  # reconciled: delta 0, nothing doubled
        finally:
            await a.store.aclose()
