"""Session state shared by every replica through Redis, with the local memory store as fallback.

Layout: one hash per session, ``{prefix}s:{session}`` (the session id is already an HMAC, never a raw key),
TTL = ``session_ttl``, refreshed on every write. Fields: ``f`` first seen, ``l`` last seen, ``q`` queries,
``v`` version, ``bt``/``bu`` token bucket, ``ku``/``kr`` block until/rule, ``t`` tracker state (bytes from
``tracking.encode_state``, at most ``max_state_bytes``), ``tl`` its write time, ``s`` last scores (JSON),
``c`` the last write chains and what each applied (the scripts' own bookkeeping, never returned).

A request reads the hash (``get``), changes the record locally, and ``put`` sends *what this request
changed* to a Lua script that merges it atomically:

- queries: the request's delta is added, so no replica's count is lost;
- block: written only when this request set it; the later ``until`` wins; an operator ``unblock`` is never
  undone by a replica that read the block before it was lifted;
- token bucket: written as is when nobody wrote since the read (same version); otherwise the local spend is
  applied to the stored bucket, capped by the larger of the two views, so the error is at most one token per
  request of the session in flight on another replica at that moment;
- tracker state and last scores: last writer wins (by request time). Trackers of two replicas answering the
  same session at the same moment each miss the other's query; counts and blocks never do;
- resends: a write whose outcome is unknown (answer later than the budget, connection dropped after the
  command was sent, which redis-py retries once) may have run. Its deltas are cumulative from the record's
  base, named by a chain id; the script applies only what a chain adds beyond its earlier writes, so a
  resend never counts a query or spends a token twice.

Redis down or slower than ``budget`` seconds: the call is answered from the local memory store (which
mirrors every record this replica has seen), counted in ``inference_guard_redis_fallbacks_total``, and a
background probe reconnects with exponential back-off. Records changed meanwhile are marked dirty; when
Redis is back they are merged into it with the same script (their changes since the last sync are deltas
against the last state read from Redis; one merge at a time per session; a record of a dirty session that
another record replaced as the local copy is merged too), counted in
``inference_guard_redis_reconciled_total{result="merged"}``. A key that was synced before and is gone
(Redis restarted empty, or failed over to a replica that missed it) is restored from the local copy
(``result="restored"``); what only Redis knew (queries answered by other replicas since this one last
synced) is lost with it. An operator reset leaves a tombstone ``{prefix}d:{session}`` for ``session_ttl`` so
that no replica restores the session it still holds locally.

Standalone Redis or Sentinel: the scripts touch keys of one session only (both keys are declared), but the
global index's script (``guard_agent.sessions.redis.global_index``) is not Redis Cluster compatible.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guard_agent.contracts import TrackerStateCodec
from guard_agent.ratelimit import Bucket
from guard_agent.sessions.base import SessionRecord
from guard_agent.sessions.memory import MemorySessionStore

__all__ = ["RedisLink", "RedisMetrics", "RedisSessionStore", "SyncedRecord"]

T = TypeVar("T")
FALLBACK: Final = object()  # what ``RedisLink.run`` returns instead of a value when Redis did not answer

_MAX_SCORES = 64
_MAX_NAME = 64
_MAX_RULE = 128
_CHAINS = 16  # write chains remembered per session hash (a resend older than this is applied again)
_ORPHANS = 16  # records per dirty session replaced as the local copy before their changes reached Redis
_CHAIN_PREFIX = os.urandom(4).hex()  # per process: chain ids of two replicas never meet
_chain_ids = itertools.count()


def _new_chain() -> str:
    """A write chain id, unique across replicas: ``{process}{counter}`` (12+ characters)."""
    return f"{_CHAIN_PREFIX}{next(_chain_ids):x}"


class RedisMetrics:
    """``inference_guard_redis_*`` metrics, registered once per registry (store and global index share them)."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, RedisMetrics]] = (
        weakref.WeakKeyDictionary())

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge("inference_guard_redis_up", "1 while Redis answers, 0 while the local fallback is used",
                        registry=r)
        self.fallbacks = Counter("inference_guard_redis_fallbacks_total",
                                 "Calls answered from local state because Redis failed, was slow or is down",
                                 ["op", "reason"], registry=r)
        self.reconnects = Counter("inference_guard_redis_reconnects_total",
                                  "Times Redis became reachable again after a failure", registry=r)
        self.reconciled = Counter("inference_guard_redis_reconciled_total",
                                  "Sessions changed during an outage and merged back into Redis", ["result"],
                                  registry=r)
        self.dirty = Gauge("inference_guard_redis_dirty_sessions",
                           "Sessions changed while Redis was unreachable, not yet merged back", registry=r)
        self.state_errors = Counter("inference_guard_redis_state_errors_total",
                                    "Session fields that could not be stored or read (kept local / reset)",
                                    ["kind"], registry=r)
        self.latency = Histogram("inference_guard_redis_call_seconds", "Redis call latency", ["op"],
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1), registry=r)
        self.up.set(1)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> RedisMetrics:
        """The one instance for this registry (a second registration would raise)."""
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


Logger = Callable[..., None]  # EventLogger.log(level, message, **fields)
# Replies that mean "this server cannot serve us now" (failover, restart, a stuck script): reconnect.
_OUTAGE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "BUSY", "NOSCRIPT", "CLUSTERDOWN")


class RedisLink:
    """One client (one connection pool) per guard process, its health, and the time budget of every call.

    ``run`` never raises for Redis trouble: it returns ``FALLBACK`` and the caller uses local state. After a
    connection error, or ``down_after_timeouts`` calls in a row slower than the budget, Redis counts as down:
    calls fall back at once (no waiting) until a background probe gets a PING through; then the
    ``on_recover`` callbacks run (e.g. reconciling sessions changed during the outage).
    """

    def __init__(self, url: str, *, prefix: str, metrics: RedisMetrics, log: Logger, budget: float = 0.05,
                 socket_timeout: float = 0.25, max_connections: int = 64,
                 backoff: tuple[float, float] = (0.2, 5.0), down_after_timeouts: int = 3) -> None:
        self.url = url
        self.prefix = prefix
        self.metrics = metrics
        self.budget = budget
        self.up = True
        self.log = log
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._backoff = backoff
        self._down_after = down_after_timeouts
        self._timeouts = 0  # consecutive: one slow call under load is not an outage
        self._last_error_log = -math.inf
        self._client: Any = None
        self._probe: asyncio.Task[None] | None = None
        self._recover: list[Callable[[], Awaitable[None]]] = []
        self._closed = False
        import redis.asyncio  # noqa: F401 - imported now, not inside the first request's time budget

    @property
    def client(self) -> Any:
        """The redis.asyncio client, created on first use (inside the running loop)."""
        if self._client is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = Redis.from_url(
                self.url, socket_timeout=self._socket_timeout, socket_connect_timeout=self._socket_timeout,
                retry=Retry(NoBackoff(), 1), max_connections=self._max_connections, decode_responses=False,
                client_name="inference-guard")
        return self._client

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time Redis answers again after a failure."""
        self._recover.append(callback)

    async def run(self, op: str, call: Callable[[Any], Awaitable[T]], *,
                  budget: float | None = None) -> T | object:
        """``await call(client)`` within the budget, else ``FALLBACK`` (counted; Redis marked down)."""
        if not self.up or self._closed:
            self.metrics.fallbacks.labels(op, "down").inc()
            return FALLBACK
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(call(self.client), budget or self.budget)
        except TimeoutError as exc:
            self._timeouts += 1
            if self._timeouts < self._down_after:
                self.metrics.fallbacks.labels(op, "timeout").inc()
                return FALLBACK
            self._failed(op, "timeout", exc)
            return FALLBACK
        except Exception as exc:  # any client/server error means: use local state
            from redis.exceptions import ResponseError

            if isinstance(exc, ResponseError) and not str(exc).startswith(_OUTAGE_REPLIES):
                self.metrics.fallbacks.labels(op, "error").inc()  # e.g. OOM: the server answers, keep using it
                now = time.monotonic()
                if now - self._last_error_log > 60.0:
                    self._last_error_log = now
                    self.log("warning", "redis command failed: using local session state for it",
                             guard={"redis": {"op": op, "error": str(exc)[:200]}})
                return FALLBACK
            self._failed(op, "error", exc)
            return FALLBACK
        self._timeouts = 0
        self.metrics.latency.labels(op).observe(time.perf_counter() - t0)
        return result

    def _failed(self, op: str, reason: str, exc: BaseException) -> None:
        self.metrics.fallbacks.labels(op, reason).inc()
        self._timeouts = 0
        if self.up:
            self.up = False
            self.metrics.up.set(0)
            self.log("warning", "redis unreachable or slow: using local session state",
                      guard={"redis": {"op": op, "reason": reason, "error": type(exc).__name__}})
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        delay = self._backoff[0]
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                # Drop every pooled connection: after a restart they are all dead.
                await asyncio.wait_for(self.client.connection_pool.disconnect(), 1.0)
                await asyncio.wait_for(self.client.ping(), max(self.budget, 0.05))
            except Exception:  # still down: back off and try again
                delay = min(delay * 2.0, self._backoff[1])
                continue
            self.up = True
            self.metrics.up.set(1)
            self.metrics.reconnects.inc()
            self.log("info", "redis reachable again: shared session state resumed", guard={"redis": {}})
            for callback in self._recover:
                try:
                    await callback()
                except Exception as exc:  # a failed reconcile must not stop the link from working
                    self.log("error", "redis recovery step failed", guard={"redis": {"error": repr(exc)[:200]}})
            if self.up:
                return
            delay = self._backoff[0]

    async def aclose(self) -> None:
        """Stop probing and close the pool (idempotent)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()


class _PendingState(Mapping[int, Any]):
    """Tracker state read from Redis, ``{layout id: state}``, decoded on first use.

    ``SessionTracking`` creates the engine of a default layout only when it first sees a request with that
    feature count, so a fresh replica may not decode another replica's state at ``get`` time; by the time the
    trackers look at the record (``peek``), the engine exists. If it still cannot be decoded, the mapping is
    empty, so the trackers start afresh for the session instead of failing (counted as a decode error).
    """

    __slots__ = ("_codec", "_decoded", "_on_error", "data")

    def __init__(self, data: bytes, codec: TrackerStateCodec, on_error: Callable[[], None]) -> None:
        self.data = data
        self._on_error = on_error
        self._decoded: dict[int, Any] | None = None
        self._codec = codec

    def _states(self) -> dict[int, Any]:
        if self._decoded is None:
            try:
                decoded = self._codec.decode_state(self.data)
            except ValueError:
                self._on_error()
                decoded = {}
            self._decoded = dict(decoded)
        return self._decoded

    def __getitem__(self, layout: int) -> Any:
        return self._states()[layout]

    def __iter__(self) -> Iterator[int]:
        return iter(self._states())

    def __len__(self) -> int:
        return len(self._states())


@dataclass(slots=True)
class _Base:
    """What this record held when it was last read from / written to Redis (for computing deltas)."""

    version: int = -1               # -1: never synced (created locally while Redis was unreachable)
    queries: int = 0
    bucket: Bucket | None = None
    block: tuple[float, str | None] = (0.0, None)
    tracker: bytes | None = None
    scores: dict[str, float] = field(default_factory=dict)
    # Every write from this base carries this id and its deltas counted from the base, so the script can
    # tell a resent write (outcome unknown: timeout, dropped connection) from a new one and apply it once.
    chain: str = field(default_factory=_new_chain)
    sent: int = 0  # writes sent from this base: only the success of the last one moves the record on


@dataclass(slots=True, frozen=True)
class _Sent:
    """One write as it was sent: its base, its number among that base's writes, and the values it carried.

    The record may change while the write is on its way (requests sharing the local copy during an outage or
    a slow Redis), so on success the base becomes these values, never the record's current ones."""

    base: _Base
    seq: int
    queries: int
    bucket: Bucket | None
    block: tuple[float, str | None]
    tracker: bytes | None
    scores: dict[str, float]


@dataclass(slots=True)
class SyncedRecord(SessionRecord):
    """A session record that remembers its last synced state."""

    base: _Base = field(default_factory=_Base)


# The session hash without its write-chain ring (``c``: the script's bookkeeping, not the replicas' business).
_FIELDS = """
local function fields(k)
  local h = redis.call('HGETALL', k)
  for i = 1, #h, 2 do
    if h[i] == 'c' then table.remove(h, i + 1); table.remove(h, i); break end
  end
  return h
end
"""

# KEYS[1] session hash, KEYS[2] its deletion tombstone.
# ARGV: 1 ttl_ms, 2 now, 3 first_seen, 4 query delta, 5 base version,
# 6 bucket? (0/1), 7 tokens, 8 updated, 9 base tokens ('' = none), 10 block until ('' = unchanged), 11 rule,
# 12 tracker? (0/1), 13 tracker bytes ('' = none), 14 tracker time, 15 scores JSON, 16 return the hash? (0/1),
# 17 absolute queries (written instead of the delta when a key synced before is gone: Redis lost it),
# 18 write chain: the id of the base the deltas are counted from (see ``_Base.chain``),
# 19 the block (ARGV 10/11) was set since the base (1) or only offered again by a merge (0: written only when
# Redis lost the key; an operator unblock or reset since the base must not be undone by it).
#
# Deltas are cumulative per chain and the hash remembers, in field ``c``, what the last _CHAINS chains have
# applied ("id queries spend;" each): a write that is sent again (redis-py's retry on a dropped connection, a
# reconcile after a put that timed out but ran) adds only what it adds beyond its chain's earlier writes; one
# that counts fewer queries than the chain's was sent before it (the two reached Redis in the reverse order)
# and its bucket is stale: left out.
_PUT = _FIELDS + """
local k = KEYS[1]
local lost = redis.call('EXISTS', k) == 0 and tonumber(ARGV[5]) > 0 and redis.call('EXISTS', KEYS[2]) == 0
local v = tonumber(redis.call('HGET', k, 'v') or '0')
local same = tonumber(ARGV[5]) == v
local chain, pq, ps = ARGV[18], 0, 0
local ring = {}
for id, q, s in string.gmatch(redis.call('HGET', k, 'c') or '', '(%S+) (%S+) (%S+);') do
  if id == chain then pq, ps = tonumber(q), tonumber(s) else ring[#ring + 1] = id .. ' ' .. q .. ' ' .. s .. ';' end
end
local f = tonumber(redis.call('HGET', k, 'f'))
if f == nil or tonumber(ARGV[3]) < f then redis.call('HSET', k, 'f', ARGV[3]) end
local l = tonumber(redis.call('HGET', k, 'l'))
if l == nil or tonumber(ARGV[2]) > l then redis.call('HSET', k, 'l', ARGV[2]) end
local dq = tonumber(ARGV[4])
if lost then redis.call('HSET', k, 'q', ARGV[17])
elseif dq > pq then redis.call('HINCRBY', k, 'q', dq - pq) end
local older = dq < pq  -- sent before a write of this chain that ran already and carries its spend too
if older then dq = pq end
local spend = ps
if ARGV[6] == '1' and not older then
  local st = tonumber(redis.call('HGET', k, 'bt'))
  local su = tonumber(redis.call('HGET', k, 'bu'))
  local lt = tonumber(ARGV[7])
  local base = tonumber(ARGV[9])
  if base ~= nil then spend = base - lt end
  if same or st == nil or su == nil then
    redis.call('HSET', k, 'bt', ARGV[7], 'bu', ARGV[8])
  else
    local merged
    if base == nil then merged = math.min(st, lt) else merged = math.min(st - (spend - ps), math.max(st, lt)) end
    if merged < 0 then merged = 0 end
    redis.call('HSET', k, 'bt', tostring(merged), 'bu', tostring(math.max(su, tonumber(ARGV[8]))))
  end
end
if lost then ring = {} end
ring[#ring + 1] = chain .. ' ' .. tostring(dq) .. ' ' .. string.format('%.9g', spend) .. ';'
local first = math.max(1, #ring - CHAINS + 1)
redis.call('HSET', k, 'c', table.concat(ring, '', first, #ring))
if ARGV[10] ~= '' and (ARGV[19] == '1' or lost) then
  local ku = tonumber(redis.call('HGET', k, 'ku'))
  if ku == nil or tonumber(ARGV[10]) >= ku then redis.call('HSET', k, 'ku', ARGV[10], 'kr', ARGV[11]) end
end
if ARGV[12] == '1' then
  local tl = tonumber(redis.call('HGET', k, 'tl'))
  if tl == nil or tonumber(ARGV[14]) >= tl then
    if ARGV[13] == '' then redis.call('HDEL', k, 't') else redis.call('HSET', k, 't', ARGV[13]) end
    redis.call('HSET', k, 'tl', ARGV[14], 's', ARGV[15])
  end
end
local nv = redis.call('HINCRBY', k, 'v', 1)
redis.call('PEXPIRE', k, ARGV[1])
if ARGV[16] == '1' then return fields(k) end
return nv
""".replace("CHAINS", str(_CHAINS))

# KEYS[1] session hash, KEYS[2] its tombstone: the hash, or a lone field ``x`` when an operator deleted it.
_GET = _FIELDS + """
local h = fields(KEYS[1])
if #h == 0 and redis.call('EXISTS', KEYS[2]) == 1 then return {'x', '1'} end
return h
"""

# KEYS[1] session hash, KEYS[2] tombstone; ARGV[1] tombstone TTL (ms).
_DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return n
"""

_UNBLOCK = """
if redis.call('HEXISTS', KEYS[1], 'kr') == 1 then
  redis.call('HDEL', KEYS[1], 'kr', 'ku')
  redis.call('HINCRBY', KEYS[1], 'v', 1)
  return 1
end
return 0
"""


class RedisSessionStore:
    """``SessionStore`` on Redis, shared by replicas; never fails a request (local fallback)."""

    backend = "redis"

    def __init__(self, link: RedisLink, *, local: MemorySessionStore, codec: TrackerStateCodec,
                 ttl: float = 3600.0, max_state_bytes: int = 64 * 1024) -> None:
        self.link = link
        self.local = local
        self.ttl = ttl
        self.max_state_bytes = max_state_bytes
        self._codec = codec
        self._dirty: OrderedDict[str, None] = OrderedDict()
        # Dirty sessions' records that stopped being the local copy (another record of the session was put or
        # read meanwhile) while their own changes may not have reached Redis: the reconcile sends them too.
        self._orphans: dict[str, list[SyncedRecord]] = {}
        self._scripts: dict[str, Any] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # per-session reconcile lock, its users
        link.metrics.dirty.set_function(lambda: len(self._dirty))
        link.on_recover(self.reconcile)

    # ---- keys and scripts ------------------------------------------------------------------------
    def key(self, session: str) -> str:
        """The Redis key of a session."""
        return f"{self.link.prefix}s:{session}"

    def keys(self, session: str) -> list[str]:
        """The session's hash and its tombstone (set by an operator reset so that nobody restores it)."""
        return [f"{self.link.prefix}s:{session}", f"{self.link.prefix}d:{session}"]

    def _script(self, client: Any, name: str) -> Any:
        if not self._scripts:
            self._scripts = {n: client.register_script(src) for n, src in
                             (("get", _GET), ("put", _PUT), ("delete", _DELETE), ("unblock", _UNBLOCK))}
        return self._scripts[name]

    # ---- SessionStore ----------------------------------------------------------------------------
    async def get(self, session: str, now: float) -> SessionRecord:
        if session in self._dirty:
            if self.link.up:
                record = await self._reconcile_one(session, want=True, budget=None)
                if record is not None:
                    return record
            if session in self._dirty:  # not merged yet: the local copy stays the truth until it is
                if not self.link.up:
                    self.link.metrics.fallbacks.labels("get", "down").inc()
                return await self._local_get(session, now)
        fields = await self._read(session)
        if fields is None:
            return await self._local_get(session, now)
        if not fields:
            held = self.local.peek(session)
            if isinstance(held, SyncedRecord) and held.base.version > 0 and now - held.last_seen < self.ttl:
                # Synced before, gone now (Redis restarted empty or failed over): restore what we know.
                restored = await self._reconcile_one(session, want=True, budget=None, restore=held.base.version)
                if restored is not None:
                    return restored
                fields = await self._read(session)  # restored or merged by someone else meanwhile
                if fields is None:
                    return await self._local_get(session, now)
        record = self._decode(fields, now)
        await self._mirror(session, record, now)
        return record

    async def _read(self, session: str) -> dict[bytes, bytes] | None:
        """The session's fields ({} when absent), or None when Redis did not answer."""
        found = await self.link.run("get", lambda c: self._script(c, "get")(keys=self.keys(session), client=c))
        if found is FALLBACK:
            return None
        assert isinstance(found, list)
        fields = dict(zip(found[::2], found[1::2], strict=True))
        if b"x" in fields:  # reset by an operator: forget the local copy too
            await self.local.delete(session)
            return {}
        return fields

    async def put(self, session: str, record: SessionRecord, now: float) -> None:
        record.last_seen = max(record.last_seen, now)
        synced = record if isinstance(record, SyncedRecord) else self._adopt(record)
        args, sent = self._changes(synced, now)
        result = await self.link.run("put", lambda c: self._script(c, "put")(
            keys=self.keys(session), args=args, client=c))
        await self._mirror(session, synced, now)
        if result is FALLBACK:
            self._mark_dirty(session)
            return
        self._synced(synced, int(result), sent)  # type: ignore[call-overload]

    async def delete(self, session: str) -> bool:
        tomb = max(1, int(self.ttl * 1000))
        gone = await self.link.run("delete", lambda c: self._script(c, "delete")(
            keys=self.keys(session), args=[tomb], client=c))
        self._dirty.pop(session, None)
        self._orphans.pop(session, None)
        local = await self.local.delete(session)
        return local or (gone is not FALLBACK and int(gone) > 0)  # type: ignore[call-overload]

    async def unblock(self, session: str) -> bool:
        done = await self.link.run("unblock", lambda c: self._script(c, "unblock")(keys=self.keys(session), client=c))
        local = await self.local.unblock(session)
        return local or (done is not FALLBACK and int(done) == 1)  # type: ignore[call-overload]

    def peek(self, session: str) -> SessionRecord | None:
        """The local copy (what this replica last saw), for the admin API."""
        return self.local.peek(session)

    async def fetch(self, session: str, now: float) -> SessionRecord | None:
        """The shared record without creating one (admin API); the local copy when Redis does not answer."""
        fields = await self._read(session)
        if fields is None:
            return self.local.peek(session)
        return self._decode(fields, now) if fields else None

    def size(self) -> int:
        return self.local.size()

    async def aclose(self) -> None:
        """Close the Redis link (the lead's app cleanup calls this)."""
        await self.link.aclose()

    # ---- fallback and reconciliation -------------------------------------------------------------
    async def _local_get(self, session: str, now: float) -> SessionRecord:
        held = self.local.peek(session)
        if isinstance(held, SyncedRecord) and now - held.last_seen < self.ttl:
            return self.local.get_sync(session, now)
        record = SyncedRecord(first_seen=now, last_seen=now)
        await self._mirror(session, record, now)
        return record

    async def _mirror(self, session: str, record: SessionRecord, now: float) -> None:
        """Keep the local store's copy pointing at the newest record of the session (the one it replaces is
        kept for the reconcile while the session is dirty and a write of it has not succeeded: it may be the
        one whose changes are not in Redis)."""
        held = self.local.peek(session)
        if held is not record:
            if isinstance(held, SyncedRecord) and held.base.sent and session in self._dirty:
                kept = self._orphans.setdefault(session, [])
                if all(o is not held for o in kept):
                    kept.append(held)
                    if len(kept) > _ORPHANS:
                        del kept[0]
                        self.link.metrics.reconciled.labels("dropped").inc()
            await self.local.delete(session)
        await self.local.put(session, record, now)

    def _mark_dirty(self, session: str) -> None:
        self._dirty[session] = None
        self._dirty.move_to_end(session)
        while len(self._dirty) > self.local.max_sessions:
            dropped, _ = self._dirty.popitem(last=False)
            self._orphans.pop(dropped, None)
            self.link.metrics.reconciled.labels("dropped").inc()

    def dirty(self) -> int:
        """Sessions changed locally and not yet merged into Redis."""
        return len(self._dirty)

    async def reconcile(self) -> None:
        """Merge every session changed during an outage into Redis (runs when Redis is back)."""
        merged = 0
        for session in list(self._dirty):
            if not self.link.up:
                break
            if await self._reconcile_one(session, want=False, budget=1.0) is not None:
                merged += 1
        self.link.log("info", "redis reconciled sessions changed during the outage",
                       guard={"redis": {"reconciled": merged, "pending": len(self._dirty)}})

    async def _reconcile_one(self, session: str, *, want: bool, budget: float | None,
                             restore: int | None = None) -> SessionRecord | None:
        """Merge the local record into Redis (one at a time per session, so no delta is applied twice).

        Without ``restore``: only while the session is dirty. With ``restore`` (the base version seen when
        the key was found missing): only if nobody synced the record since. None when there was nothing to
        do (the caller reads Redis again) or Redis did not answer.
        """
        lock, users = self._locks.get(session) or (asyncio.Lock(), 0)
        self._locks[session] = (lock, users + 1)
        try:
            async with lock:
                return await self._reconcile_locked(session, want=want, budget=budget, restore=restore)
        finally:
            lock, users = self._locks[session]
            if users == 1:
                del self._locks[session]
            else:
                self._locks[session] = (lock, users - 1)

    async def _reconcile_locked(self, session: str, *, want: bool, budget: float | None,
                                restore: int | None) -> SessionRecord | None:
        held = self.local.peek(session)
        if not isinstance(held, SyncedRecord):
            self._dirty.pop(session, None)
            self._orphans.pop(session, None)
            return None
        if restore is None:
            if self._dirty.pop(session, False) is not None:
                return None  # merged already by a concurrent caller
            if not await self._merge_orphans(session, held.last_seen, budget):
                self.link.metrics.reconciled.labels("failed").inc()
                self._mark_dirty(session)
                return None
        elif held.base.version != restore or session in self._dirty:
            return None
        now = held.last_seen
        args, sent = self._changes(held, now, full=True)
        args[15] = "1" if want else "0"
        result = await self.link.run("reconcile", lambda c: self._script(c, "put")(
            keys=self.keys(session), args=args, client=c), budget=budget)
        if result is FALLBACK:
            self.link.metrics.reconciled.labels("failed").inc()
            if restore is None:
                self._mark_dirty(session)
            return None
        self.link.metrics.reconciled.labels("merged" if restore is None else "restored").inc()
        if not want:
            self._synced(held, int(result), sent)  # type: ignore[call-overload]
            return held
        assert isinstance(result, list)
        record = self._decode(dict(zip(result[::2], result[1::2], strict=True)), now)
        self._synced(held, record.base.version, sent)  # a request still holding it sends no delta twice
        await self._mirror(session, record, now)
        return record

    async def _merge_orphans(self, session: str, now: float, budget: float | None) -> bool:
        """Send the changes of the session's replaced records (their chains make a write that ran count once);
        False when Redis did not answer (the rest stay for the next reconcile)."""
        orphans = self._orphans.pop(session, [])
        while orphans:
            r = orphans[0]
            # Synced since (its base moved on), or older than the TTL (Redis forgot the session too): skip.
            if r.base.sent and now - r.last_seen < self.ttl:
                args, sent = self._changes(r, r.last_seen)
                result = await self.link.run("reconcile", self._put_call(session, args), budget=budget)
                if result is FALLBACK:
                    self._orphans[session] = orphans + self._orphans.get(session, [])
                    return False
                self._synced(r, int(result), sent)  # type: ignore[call-overload]
            del orphans[0]
        return True

    def _put_call(self, session: str, args: list[Any]) -> Callable[[Any], Awaitable[Any]]:
        return lambda c: self._script(c, "put")(keys=self.keys(session), args=args, client=c)

    # ---- encoding --------------------------------------------------------------------------------
    def _adopt(self, record: SessionRecord) -> SyncedRecord:
        """A plain record (never synced) as a SyncedRecord; every field counts as a change."""
        return SyncedRecord(first_seen=record.first_seen, last_seen=record.last_seen, queries=record.queries,
                            bucket=record.bucket, blocked_until=record.blocked_until,
                            blocked_rule=record.blocked_rule, tracker_state=record.tracker_state,
                            scores=record.scores)

    def _encode_tracker(self, record: SessionRecord) -> bytes | None:
        if isinstance(record.tracker_state, _PendingState) and record.tracker_state._decoded is None:
            return record.tracker_state.data  # untouched since read: exactly the bytes Redis holds
        try:
            data = self._codec.encode_state(record.tracker_state)
        except (ValueError, TypeError):
            self.link.metrics.state_errors.labels("encode").inc()
            return None
        if data is not None and len(data) > self.max_state_bytes:
            self.link.metrics.state_errors.labels("oversize").inc()
            return None
        return data

    def _changes(self, r: SyncedRecord, now: float, *, full: bool = False) -> tuple[list[Any], _Sent]:
        """Script arguments for what changed since the last sync (``full``: offer every field; the merge
        rules still decide, so a newer tracker state or a later block in Redis wins), and the write's values
        for ``_synced``. Counts the write as sent from the record's base (``base.sent``): call it once per write
        actually sent."""
        b = r.base
        tracker = self._encode_tracker(r)
        storable = tracker is not None or r.tracker_state is None  # an unstorable state leaves Redis's as is
        tracker_changed = storable and (full or tracker != b.tracker or r.scores != b.scores)
        set_block = r.blocked_rule is not None and (r.blocked_until, r.blocked_rule) != b.block
        new_block = set_block or (full and r.blocked_rule is not None)
        scores = {str(k)[:_MAX_NAME]: float(v) for k, v in list(r.scores.items())[:_MAX_SCORES]
                  if isinstance(v, int | float) and math.isfinite(v)}
        args: list[Any] = [
            max(1, int(self.ttl * 1000)), repr(now), repr(r.first_seen), str(r.queries - b.queries), str(b.version),
            "1" if r.bucket is not None and r.bucket != b.bucket else "0",
            repr(r.bucket.tokens) if r.bucket else "0", repr(r.bucket.updated) if r.bucket else "0",
            # Base tokens unknown (new bucket): assume this request spent one token of a fresh bucket.
            repr(b.bucket.tokens) if b.bucket is not None and b.version >= 0 else
            (repr(r.bucket.tokens + 1.0) if r.bucket else ""),
            repr(r.blocked_until) if new_block else "", (r.blocked_rule or "")[:_MAX_RULE],
            "1" if tracker_changed else "0", tracker or b"", repr(r.last_seen), orjson.dumps(scores), "0",
            str(r.queries), b.chain, "1" if set_block else "0",
        ]
        b.sent += 1
        return args, _Sent(b, b.sent, r.queries, r.bucket, (r.blocked_until, r.blocked_rule), tracker, dict(r.scores))

    def _synced(self, r: SyncedRecord, version: int, sent: _Sent) -> None:
        """Redis applied ``sent``: count the record's next deltas from it, under a new chain.

        Not when a later write from the same base is on its way: its deltas count from that base too, so the
        base stays (and with it the chain, whose resends the script applies once) until that write answers.
        """
        if r.base is not sent.base or sent.seq != sent.base.sent:
            return
        r.base = _Base(version=version, queries=sent.queries, bucket=sent.bucket, block=sent.block,
                       tracker=sent.tracker, scores=sent.scores)

    def _decode(self, h: dict[bytes, bytes], now: float) -> SyncedRecord:
        if not h or b"f" not in h:
            return SyncedRecord(first_seen=now, last_seen=now, base=_Base(version=int(h.get(b"v", 0) or 0)))
        try:
            first, last = float(h[b"f"]), float(h.get(b"l", h[b"f"]))
            bucket = Bucket(float(h[b"bt"]), float(h[b"bu"])) if b"bt" in h and b"bu" in h else None
            rule = h[b"kr"].decode("utf-8", "replace") if b"kr" in h else None
            until = float(h[b"ku"]) if rule is not None and b"ku" in h else 0.0
            queries, version = int(h.get(b"q", 0)), int(h.get(b"v", 0))
            numbers = (first, last, until) + ((bucket.tokens, bucket.updated) if bucket else ())
            if not all(map(math.isfinite, numbers)):
                raise ValueError("non-finite number")
        except (ValueError, KeyError):
            self.link.metrics.state_errors.labels("decode").inc()
            return SyncedRecord(first_seen=now, last_seen=now, base=_Base(version=-1))
        tracker_bytes = h.get(b"t")
        tracker_state: Any = None
        if tracker_bytes:
            try:
                tracker_state = self._codec.decode_state(tracker_bytes)
            except ValueError:  # an engine not created yet in this process, or garbage: decide on first use
                tracker_state = _PendingState(tracker_bytes, self._codec,
                                              self.link.metrics.state_errors.labels("decode").inc)
        scores = _decode_scores(h.get(b"s"))
        record = SyncedRecord(first_seen=first, last_seen=last, queries=queries, bucket=bucket,
                              blocked_until=until, blocked_rule=rule, tracker_state=tracker_state, scores=scores)
        record.base = _Base(version=version, queries=queries, bucket=bucket, block=(until, rule),
                            tracker=tracker_bytes, scores=dict(scores))
        return record


def _decode_scores(raw: bytes | None) -> dict[str, float]:
    if not raw:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): float(v) for k, v in list(doc.items())[:_MAX_SCORES] if isinstance(v, int | float)}
