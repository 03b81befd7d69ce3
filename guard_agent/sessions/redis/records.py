"""Session records that remember what Redis held when they were last synced, so a write sends deltas."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from guard_agent.contracts import TrackerStateCodec
from guard_agent.ratelimit import Bucket
from guard_agent.sessions.base import SessionRecord

__all__ = ["Base", "PendingState", "Sent", "SyncedRecord"]

_CHAIN_PREFIX = os.urandom(4).hex()  # per process: chain ids of two replicas never meet
_chain_ids = itertools.count()


def _new_chain() -> str:
    """A write chain id, unique across replicas: ``{process}{counter}`` (12+ characters)."""
    return f"{_CHAIN_PREFIX}{next(_chain_ids):x}"


class PendingState(Mapping[int, Any]):
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

    @property
    def untouched(self) -> bytes | None:
        """The bytes as read while nobody has decoded them (then they are exactly what Redis holds), else None."""
        return self.data if self._decoded is None else None

    def __getitem__(self, layout: int) -> Any:
        return self._states()[layout]

    def __iter__(self) -> Iterator[int]:
        return iter(self._states())

    def __len__(self) -> int:
        return len(self._states())


@dataclass(slots=True)
class Base:
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
class Sent:
    """One write as it was sent: its base, its number among that base's writes, and the values it carried.

    The record may change while the write is on its way (requests sharing the local copy during an outage or
    a slow Redis), so on success the base becomes these values, never the record's current ones."""

    base: Base
    seq: int
    queries: int
    bucket: Bucket | None
    block: tuple[float, str | None]
    tracker: bytes | None
    scores: dict[str, float]


@dataclass(slots=True)
class SyncedRecord(SessionRecord):
    """A session record that remembers its last synced state."""

    base: Base = field(default_factory=Base)
