"""In-memory session store: LRU + TTL with a hard bound on the number of sessions.

An ``OrderedDict`` kept in last-use order gives O(1) get/put; expired sessions
are dropped from the old end as new ones arrive, and when the bound is hit the
least recently used session is evicted (counted, so an operator sees pressure).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from guard_agent.sessions.base import SessionRecord

__all__ = ["MemorySessionStore"]


class MemorySessionStore:
    backend = "memory"

    def __init__(self, *, max_sessions: int = 100_000, ttl: float = 3600.0,
                 on_evict: Callable[[str], None] | None = None) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
        self._on_evict = on_evict

    def _expire(self, now: float) -> None:
        records = self._records
        while records:
            oldest_key = next(iter(records))
            oldest = records[oldest_key]
            if now - oldest.last_seen < self.ttl and len(records) < self.max_sessions:
                return
            expired = now - oldest.last_seen >= self.ttl
            records.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict("expired" if expired else "capacity")

    def get_sync(self, session: str, now: float) -> SessionRecord:
        record = self._records.get(session)
        if record is not None and now - record.last_seen < self.ttl:
            self._records.move_to_end(session)
            return record
        if record is not None:
            del self._records[session]
        self._expire(now)
        record = SessionRecord(first_seen=now, last_seen=now)
        self._records[session] = record
        return record

    async def get(self, session: str, now: float) -> SessionRecord:
        return self.get_sync(session, now)

    async def put(self, session: str, record: SessionRecord, now: float) -> None:
        record.last_seen = now
        if session not in self._records:
            self._expire(now)
            self._records[session] = record
        else:
            self._records.move_to_end(session)

    async def delete(self, session: str) -> bool:
        return self._records.pop(session, None) is not None

    async def unblock(self, session: str) -> bool:
        record = self._records.get(session)
        if record is None or record.blocked_rule is None:
            return False
        record.blocked_rule, record.blocked_until = None, 0.0
        return True

    def peek(self, session: str) -> SessionRecord | None:
        return self._records.get(session)

    async def fetch(self, session: str, now: float) -> SessionRecord | None:
        return self._records.get(session)

    def size(self) -> int:
        return len(self._records)

    async def aclose(self) -> None:
        return None
