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
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from guard_agent.contracts import TrackerStateCodec
from guard_agent.ratelimit import Bucket
from guard_agent.sessions.base import SessionRecord
from guard_agent.sessions.memory import MemorySessionStore
from guard_agent.sessions.redis.link import FALLBACK, RedisLink
from guard_agent.sessions.redis.lua import DELETE, GET, PUT, UNBLOCK
from guard_agent.sessions.redis.records import Base, PendingState, Sent, SyncedRecord

__all__ = ["RedisSessionStore"]

_MAX_SCORES = 64
_MAX_NAME = 64
_MAX_RULE = 128
_ORPHANS = 16  # records per dirty session replaced as the local copy before their changes reached Redis


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
                             (("get", GET), ("put", PUT), ("delete", DELETE), ("unblock", UNBLOCK))}
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
        if isinstance(record.tracker_state, PendingState) and record.tracker_state.untouched is not None:
            return record.tracker_state.untouched
        try:
            data = self._codec.encode_state(record.tracker_state)
        except (ValueError, TypeError):
            self.link.metrics.state_errors.labels("encode").inc()
            return None
        if data is not None and len(data) > self.max_state_bytes:
            self.link.metrics.state_errors.labels("oversize").inc()
            return None
        return data

    def _changes(self, r: SyncedRecord, now: float, *, full: bool = False) -> tuple[list[Any], Sent]:
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
        return args, Sent(b, b.sent, r.queries, r.bucket, (r.blocked_until, r.blocked_rule), tracker, dict(r.scores))

    def _synced(self, r: SyncedRecord, version: int, sent: Sent) -> None:
        """Redis applied ``sent``: count the record's next deltas from it, under a new chain.

        Not when a later write from the same base is on its way: its deltas count from that base too, so the
        base stays (and with it the chain, whose resends the script applies once) until that write answers.
        """
        if r.base is not sent.base or sent.seq != sent.base.sent:
            return
        r.base = Base(version=version, queries=sent.queries, bucket=sent.bucket, block=sent.block,
                       tracker=sent.tracker, scores=sent.scores)

    def _decode(self, h: dict[bytes, bytes], now: float) -> SyncedRecord:
        if not h or b"f" not in h:
            return SyncedRecord(first_seen=now, last_seen=now, base=Base(version=int(h.get(b"v", 0) or 0)))
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
            return SyncedRecord(first_seen=now, last_seen=now, base=Base(version=-1))
        tracker_bytes = h.get(b"t")
        tracker_state: Any = None
        if tracker_bytes:
            try:
                tracker_state = self._codec.decode_state(tracker_bytes)
            except ValueError:  # an engine not created yet in this process, or garbage: decide on first use
                tracker_state = PendingState(tracker_bytes, self._codec,
                                              self.link.metrics.state_errors.labels("decode").inc)
        scores = _decode_scores(h.get(b"s"))
        record = SyncedRecord(first_seen=first, last_seen=last, queries=queries, bucket=bucket,
                              blocked_until=until, blocked_rule=rule, tracker_state=tracker_state, scores=scores)
        record.base = Base(version=version, queries=queries, bucket=bucket, block=(until, rule),
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
