"""The session store contract shared by the in-memory and Redis back ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from guard_agent.ratelimit import Bucket

__all__ = ["SessionRecord", "SessionStore"]


@dataclass(slots=True)
class SessionRecord:
    """Everything the guard keeps about one session; small and bounded."""

    first_seen: float
    last_seen: float
    queries: int = 0
    bucket: Bucket | None = None
    blocked_until: float = 0.0
    blocked_rule: str | None = None
    tracker_state: Any = None           # opaque to the store; owned by the session trackers
    scores: dict[str, float] = field(default_factory=dict)  # the trackers' last scores

    def blocked(self, now: float) -> str | None:
        """The rule that blocked the session while its cool-down lasts, else None."""
        return self.blocked_rule if self.blocked_rule is not None and now < self.blocked_until else None


class SessionStore(Protocol):
    """Async so that the Redis back end fits; the memory back end never awaits I/O."""

    backend: str

    async def get(self, session: str, now: float) -> SessionRecord:
        """The session's record, created when absent or expired."""

    async def put(self, session: str, record: SessionRecord, now: float) -> None:
        """Store the record after the request (the memory store already holds it)."""

    async def delete(self, session: str) -> bool:
        """Forget a session entirely (operator reset)."""

    async def unblock(self, session: str) -> bool:
        """Lift a block cool-down, keeping the rest of the state."""

    def peek(self, session: str) -> SessionRecord | None:
        """This process's copy of the record, never created (metrics, tests)."""

    async def fetch(self, session: str, now: float) -> SessionRecord | None:
        """The authoritative record without creating one (the admin API): the shared one where there is one."""

    def size(self) -> int:
        """Live sessions held locally."""

    async def aclose(self) -> None:
        """Release connections (called last at shutdown)."""
