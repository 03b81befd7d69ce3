"""Plug points of the request path as typed Protocols: what a caller may rely on, nothing it must probe for.

Implementations are passed in where they are used (constructor arguments); no caller checks with
``getattr``/``hasattr`` and nothing is monkeypatched. Where a guard runs without a component, a small null
object stands in (``guard_agent.state``: ``NoProfile``, ``NoTrackers``, ``NoIntegrity``), so the request path
never branches on whether one is configured.

| seam | implementation | null object |
|---|---|---|
| ``ProfileSource`` | ``profiles.ProfileStore`` | ``NoProfile`` |
| ``Trackers`` | ``tracking.SessionTracking`` | ``NoTrackers`` |
| ``Integrity`` | ``integrity.IntegrityChecker`` | ``NoIntegrity`` |
| ``Capture`` | ``capture.CaptureWriter`` | None (nothing is captured) |
| ``AsyncScorer`` | ``squeezing.SqueezeScorer`` | no scorer |
| ``SessionStore`` | ``sessions.memory``, ``sessions.redis_store`` | (always one) |
| ``Reloadable`` | ``auth.KeyStore``, ``auth.JwtVerifier``, ``tls.TlsReloader`` | not listed |
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from aiohttp import web

from guard_agent.sessions.base import SessionRecord, SessionStore

if TYPE_CHECKING:
    from detectors import Profile
    from detectors.text import TextModel
    from guard_agent.protocols import ParsedResponse
    from guard_agent.scoring import ScoringContext

__all__ = [
    "AsyncScorer",
    "Capture",
    "Density",
    "GlobalObserver",
    "Integrity",
    "Lifecycle",
    "ProfileSource",
    "Reloadable",
    "RowScorer",
    "SessionStore",
    "TrackerStateCodec",
    "Trackers",
]

Lifecycle = Callable[[web.Application], AsyncIterator[None]]
"""An aiohttp ``cleanup_ctx`` entry: starts a component's background work, stops it at shutdown."""

Density = np.ndarray | Callable[[int], float] | None
"""Per row, the share of the reference sample near it: an array, a function of the row index (computed only
for rows that turn out to have near-duplicates), or None (zeros)."""


class ProfileSource(Protocol):
    """The fitted detector profiles the requests are scored with, hot-reloaded from their files."""

    @property
    def revision(self) -> str | None:
        """What every decision event names (None: no profile)."""
        ...

    @property
    def score_names(self) -> frozenset[str]: ...

    @property
    def profiles(self) -> Mapping[str, Profile]:
        """The loaded profiles by model (``""``: one profile for every model)."""
        ...

    def expected_features(self, model: str | None) -> int | None: ...

    def profile_for(self, model: str | None) -> Profile | None:
        """The fitted profile that scores ``model``'s requests (None: built-in checks only)."""
        ...

    def text_model(self, model: str | None) -> TextModel | None:
        """The model's fitted text projection and checks (profiles fitted with ``fit --text``)."""
        ...

    def score(self, ctx: ScoringContext) -> Mapping[str, float]: ...

    async def score_batched(self, ctx: ScoringContext) -> Mapping[str, float]:
        """``score``, free to score this request's rows together with concurrent requests' (same results)."""
        ...

    def changed_on_disk(self) -> bool:
        """Whether a profile file changed since the last load (the reloader then calls ``reload``)."""
        ...

    def reload(self) -> None:
        """Load the changed files; raises ProfileError, OSError or ValueError and keeps the last good ones."""
        ...


class TrackerStateCodec(Protocol):
    """What a shared session store needs from the session trackers: their state to bytes and back."""

    def encode_state(self, held: Any) -> bytes | None:
        """Tracker state to bytes (None: nothing to store)."""
        ...

    def decode_state(self, data: bytes) -> Any:
        """Bytes back to tracker state; ValueError for garbage or a layout this process cannot build."""
        ...


class Trackers(TrackerStateCodec, Protocol):
    """The session trackers: ``peek`` before deciding, ``update`` after the model answered."""

    score_names: frozenset[str]

    async def peek(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
                   now: float) -> Mapping[str, float]:
        """The session's scores before this request, plus scores of this request against all sessions."""
        ...

    async def update(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
                     response: ParsedResponse | None, now: float,
                     scores: Mapping[str, float]) -> Mapping[str, float]:
        """Learn from the request and the model's answer (None: unreadable or not a class answer); returns the
        session's new scores."""
        ...

    def inactive(self) -> Mapping[str, str]:
        """Session scores that cannot work here (score name -> why), for /readyz, the log and a metric."""
        ...


class Integrity(Protocol):
    """Model integrity (canaries, signed model files): ``integrity.canary`` is 1.0 while the model fails."""

    score_names: frozenset[str]

    def score(self, model: str | None) -> float | None:
        """1.0 failed, 0.0 passing, None not checked (yet)."""
        ...

    @property
    def ready(self) -> bool:
        """False until the first verdicts are in (``/readyz`` waits for them)."""
        ...

    def waiting_reason(self) -> str | None:
        """Why ``ready`` is False, for the ``/readyz`` body; None once ready."""
        ...

    def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """The checks' background loops (a ``Lifecycle``)."""
        ...


class Capture(Protocol):
    """Decision capture for replay and tuning: receives every inference decision event, unsampled."""

    def record(self, fields: Mapping[str, Any], features: Any, scores: Mapping[str, float] | None = None) -> None:
        """``fields`` is the decision event; ``scores`` the unrounded scores (the event rounds them)."""
        ...

    def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Flushes and closes the capture at shutdown (a ``Lifecycle``)."""
        ...


class AsyncScorer(Protocol):
    """A scorer that waits on I/O (feature squeezing asks the model): run under the policy's time budget."""

    provides: frozenset[str]

    def __call__(self, ctx: ScoringContext) -> Awaitable[Mapping[str, float]]: ...


class Reloadable(Protocol):
    """A credential file the guard re-reads when it changes (API keys, the JWKS, the TLS certificate)."""

    def maybe_reload(self) -> bool:
        """Re-read the file if it changed: True when it did; raises (AuthError, TlsError) and keeps the old."""
        ...


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


class RowScorer(Protocol):
    """Per-row calibrated scores of a batch of rows (``detectors.Profile``), for ``RowBatcher``."""

    def score(self, X: np.ndarray) -> Mapping[str, np.ndarray]: ...
