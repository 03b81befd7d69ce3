"""The session records one request reads and writes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from guard_agent.contracts import SessionStore, Trackers
from guard_agent.identity import Identity
from guard_agent.policy.model import Decision, EffectivePolicy, RateLimit
from guard_agent.protocols import ParsedResponse
from guard_agent.ratelimit import cooldown_start, rate_check
from guard_agent.sessions.base import SessionRecord

__all__ = ["RequestSessions"]


class RequestSessions:
    """The request's session record and, for an unverified credential, its client address's record too.

    Without a key store anyone can invent keys, so each such request also counts against (and is refused by) the
    address's session: its bucket, its trackers and its block. Both records are read once and written once.
    """

    __slots__ = ("_store", "_trackers", "entries")

    def __init__(self, entries: list[tuple[str, SessionRecord]], store: SessionStore, trackers: Trackers) -> None:
        self.entries = entries
        self._store = store
        self._trackers = trackers

    @classmethod
    async def load(cls, store: SessionStore, trackers: Trackers, identity: Identity, now: float) -> RequestSessions:
        """The records from ``store``; ``trackers`` score and learn them."""
        entries = [(identity.session, await store.get(identity.session, now))]
        shared = identity.address_session
        if shared is not None and shared != identity.session:
            entries.append((shared, await store.get(shared, now)))
        return cls(entries, store, trackers)

    @property
    def record(self) -> SessionRecord:
        return self.entries[0][1]

    @property
    def queries(self) -> int:
        """The larger query count of the records (one record for most requests: no generator for it)."""
        entries = self.entries
        if len(entries) == 1:
            return entries[0][1].queries
        return max(r.queries for _, r in entries)

    def take(self, now: float, limit: RateLimit | None) -> tuple[bool, float]:
        """One token from every bucket (``ratelimit.rate_check``, as the replay): (refused, seconds until the
        emptiest refills)."""
        refused, retry_after = False, 0.0
        for _, record in self.entries:
            record.bucket, limited, wait = rate_check(record.bucket, now, limit)
            if limited:
                refused, retry_after = True, max(retry_after, wait)
        return refused, retry_after

    def blocked(self, now: float) -> str | None:
        """The rule of the first record's running cool-down, None when no record is blocked."""
        for _, record in self.entries:
            rule = record.blocked(now)
            if rule is not None:
                return rule
        return None

    def block(self, decision: Decision, policy: EffectivePolicy, now: float) -> None:
        """The cool-down the decision starts (``ratelimit.cooldown_start``, as the replay) on every record."""
        for _, record in self.entries:
            started = cooldown_start(decision, policy, now, record.blocked(now))
            if started is not None:
                record.blocked_until, record.blocked_rule = started

    def count(self, rows: int) -> None:
        for _, record in self.entries:
            record.queries += rows

    async def peek(self, features: np.ndarray, model: str | None, now: float) -> dict[str, float]:
        """The trackers' scores, the worse of the two sessions' for each name."""
        merged: dict[str, float] = {}
        for session, record in self.entries:
            for name, value in (await self._trackers.peek(session, record, features, model, now)).items():
                merged[name] = max(value, merged.get(name, value))
        return merged

    async def learn(self, features: np.ndarray, model: str | None, answered: ParsedResponse | None, now: float,
                    scores: Mapping[str, float]) -> None:
        """The trackers learn the request and the model's answer; each record keeps its new session scores."""
        for session, record in self.entries:
            tracker_scores = await self._trackers.update(session, record, features, model, answered, now, scores)
            if tracker_scores:
                record.scores = dict(tracker_scores)

    async def save(self, now: float) -> None:
        """The one write of the records, after the request."""
        for session, record in self.entries:
            await self._store.put(session, record, now)
