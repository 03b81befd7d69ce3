"""The session records one request reads and writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from guard_agent.identity import Identity
from guard_agent.policy.model import Decision, EffectivePolicy, RateLimit
from guard_agent.ratelimit import cooldown_start, rate_check
from guard_agent.sessions.base import SessionRecord
from guard_agent.state import GuardState

__all__ = ["RequestSessions"]


class RequestSessions:
    """The request's session record and, for an unverified credential, its client address's record too.

    Without a key store anyone can invent keys, so each such request also counts against (and is refused by) the
    address's session: its bucket, its trackers and its block. Both records are read once and written once.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[str, SessionRecord]]) -> None:
        self.entries = entries

    @classmethod
    async def load(cls, state: GuardState, identity: Identity, now: float) -> RequestSessions:
        entries = [(identity.session, await state.sessions.get(identity.session, now))]
        shared = identity.address_session
        if shared is not None and shared != identity.session:
            entries.append((shared, await state.sessions.get(shared, now)))
        return cls(entries)

    @property
    def record(self) -> SessionRecord:
        return self.entries[0][1]

    @property
    def queries(self) -> int:
        return max(r.queries for _, r in self.entries)

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
        return next((rule for _, r in self.entries if (rule := r.blocked(now)) is not None), None)

    def block(self, decision: Decision, policy: EffectivePolicy, now: float) -> None:
        """The cool-down the decision starts (``ratelimit.cooldown_start``, as the replay) on every record."""
        for _, record in self.entries:
            started = cooldown_start(decision, policy, now, record.blocked(now))
            if started is not None:
                record.blocked_until, record.blocked_rule = started

    def count(self, rows: int) -> None:
        for _, record in self.entries:
            record.queries += rows

    async def peek(self, state: GuardState, features: np.ndarray, model: str | None,
                   now: float) -> dict[str, float]:
        """The trackers' scores, the worse of the two sessions' for each name."""
        merged: dict[str, float] = {}
        for session, record in self.entries:
            for name, value in (await state.trackers.peek(session, record, features, model, now)).items():
                merged[name] = max(value, merged.get(name, value))
        return merged

    async def learn(self, state: GuardState, features: np.ndarray, model: str | None, answered: Any, now: float,
                    scores: Mapping[str, float]) -> None:
        for session, record in self.entries:
            tracker_scores = await state.trackers.update(session, record, features, model, answered, now, scores)
            if tracker_scores:
                record.scores = dict(tracker_scores)

    async def save(self, state: GuardState, now: float) -> None:
        for session, record in self.entries:
            await state.sessions.put(session, record, now)
