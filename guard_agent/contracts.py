"""Plug points of the request path as typed Protocols: what a caller may rely on, nothing it must probe for.

Implementations are passed in where they are used (constructor arguments); no caller checks with
``getattr``/``hasattr`` and nothing is monkeypatched. The session store's contract is
``guard_agent.sessions.base.SessionStore``; the profile, tracker, integrity and capture seams are still the
null-object base classes of ``guard_agent.state``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

__all__ = ["GlobalObserver", "RowScorer", "TrackerStateCodec"]

Density = np.ndarray | Callable[[int], float] | None
"""Per row, the share of the reference sample near it: an array, a function of the row index (computed only
for rows that turn out to have near-duplicates), or None (zeros)."""


class GlobalObserver(Protocol):
    """The global near-duplicate index (queries of every session): the in-process ``GlobalFingerprintIndex``
    wrapped by the session trackers, or ``RedisGlobalIndex`` shared by every replica and worker."""

    async def observe(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                      density: Density = None) -> float:
        """Insert this request's rows; the score of its row with the most near-duplicates from other sessions."""
        ...

    async def learn(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, labels: np.ndarray,
                    now: float) -> None:
        """The model's answers (one class per row) for rows ``observe`` saw: clusters answered with two classes
        straddle the decision boundary and count from then on (``GlobalFingerprintIndex.learn``)."""
        ...


class TrackerStateCodec(Protocol):
    """What a shared session store needs from the session trackers: their state to bytes and back."""

    def encode_state(self, held: Any) -> bytes | None:
        """Tracker state to bytes (None: nothing to store)."""
        ...

    def decode_state(self, data: bytes) -> Any:
        """Bytes back to tracker state; ValueError for garbage or a layout this process cannot build."""
        ...


class RowScorer(Protocol):
    """Per-row calibrated scores of a batch of rows (``detectors.Profile``), for ``RowBatcher``."""

    def score(self, X: np.ndarray) -> Mapping[str, np.ndarray]: ...
