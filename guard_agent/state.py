"""Shared state of one guard process, behind typed aiohttp AppKeys."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from detectors import Profile
from detectors.text import TextModel
from guard_agent.events import EventLogger
from guard_agent.identity import IdentityResolver
from guard_agent.metrics import Metrics
from guard_agent.ops_metrics import OpsMetrics
from guard_agent.policy.store import PolicyStore
from guard_agent.protocols import ParseLimits
from guard_agent.recent import RecentDecisions
from guard_agent.routes import RouteTable
from guard_agent.scoring import ScoringContext
from guard_agent.sessions.base import SessionStore
from guard_agent.settings import Settings

if TYPE_CHECKING:
    from guard_agent.reloading import Reloader

__all__ = ["STATE", "GuardState", "ProfileSource", "Reloadable", "TrackerHook"]


class Reloadable(Protocol):
    """A credential file the guard re-reads when it changes (API keys, the JWKS, the TLS certificate)."""

    def maybe_reload(self) -> bool:
        """Re-read the file if it changed: True when it did; raises (AuthError, TlsError) and keeps the old."""
        ...


class ProfileSource:
    """What the guard needs from a profile store (real one in profiles.py; None = built-in checks only)."""

    @property
    def revision(self) -> str | None:
        return None

    @property
    def score_names(self) -> frozenset[str]:
        return frozenset()

    def expected_features(self, model: str | None) -> int | None:
        return None

    def profile_for(self, model: str | None) -> Profile | None:
        """The fitted profile that scores ``model``'s requests (None: built-in checks only)."""
        return None

    def score(self, ctx: ScoringContext) -> Mapping[str, float]:
        return {}

    def text_model(self, model: str | None) -> TextModel | None:
        """The model's fitted text projection and checks (profiles fitted with ``fit --text``)."""
        return None

    async def score_batched(self, ctx: ScoringContext) -> Mapping[str, float]:
        """``score``, free to score this request's rows together with concurrent requests' (same results)."""
        return self.score(ctx)

    def changed_on_disk(self) -> bool:
        """Whether a profile file changed since the last load (the watcher then calls ``reload``)."""
        return False

    def reload(self) -> None:
        """Load the changed files; raises ProfileError, OSError or ValueError and keeps the last good ones."""
        return


class TrackerHook:
    """The session-tracker seam: peek before deciding, update after the model answered."""

    score_names: frozenset[str] = frozenset()

    async def peek(self, session: str, record: Any, features: Any, model: str | None,
                   now: float) -> Mapping[str, float]:
        """The session's scores before this request, plus scores of this request against all sessions."""
        return {}

    async def update(self, session: str, record: Any, features: Any, model: str | None, response: Any, now: float,
                     scores: Mapping[str, float]) -> Mapping[str, float]:
        """Learn from the request and the model's answer; returns the session's new scores."""
        return {}

    def inactive(self) -> Mapping[str, str]:
        """Session scores that cannot work here (score name -> why), for /readyz, the log and a metric."""
        return {}

    def encode_state(self, held: Any) -> bytes | None:
        """Tracker state to bytes for a shared store (None = nothing to store)."""
        return None

    def decode_state(self, data: bytes) -> Any:
        """Bytes from a shared store back to tracker state; raises ValueError on garbage."""
        raise ValueError("no session trackers configured")


class IntegrityHook:
    """The model-integrity seam (canaries, signed artifacts): 1.0 = the model failed its check."""

    def score(self, model: str | None) -> float | None:
        return None


class CaptureHook:
    """The decision-capture seam: receives every inference decision event, unsampled."""

    def record(self, fields: Mapping[str, Any], features: Any, scores: Mapping[str, float] | None = None) -> None:
        """``fields`` is the decision event; ``scores`` the unrounded scores (the event rounds them)."""
        return

    def close(self) -> None:
        return None


@dataclass
class GuardState:
    settings: Settings
    routes: RouteTable
    identity: IdentityResolver
    policies: PolicyStore
    sessions: SessionStore
    events: EventLogger
    metrics: Metrics
    profile: ProfileSource = field(default_factory=ProfileSource)
    trackers: TrackerHook = field(default_factory=TrackerHook)
    integrity: IntegrityHook = field(default_factory=IntegrityHook)
    capture: CaptureHook | None = None
    async_scorers: tuple[Callable[[ScoringContext], Awaitable[Mapping[str, float]]], ...] = ()
    client: aiohttp.ClientSession | None = None
    upstream_ok: bool = False
    shutting_down: bool = False
    started: float = field(default_factory=time.time)
    in_flight: int = 0
    parse_limits: ParseLimits = field(default_factory=ParseLimits)
    recent: RecentDecisions | None = None  # what /admin/decisions and `guard-agent status` read
    ops: OpsMetrics | None = None          # readiness and profile gauges, refreshed per scrape
    credential_files: tuple[tuple[str, Reloadable], ...] = ()  # (name, file) re-read when it changes
    reloader: Reloader = field(init=False)  # policy and profile reloads: watcher, SIGHUP and the admin API

    def available_scores(self) -> frozenset[str]:
        from guard_agent.policy.model import BUILTIN_SCORES

        integrity = frozenset({"integrity.canary"}) if type(self.integrity) is not IntegrityHook else frozenset()
        return (BUILTIN_SCORES | self.profile.score_names | self.trackers.score_names | self._async_score_names()
                | integrity)

    def _async_score_names(self) -> frozenset[str]:
        names: set[str] = set()
        for scorer in self.async_scorers:
            names |= set(getattr(scorer, "provides", ()))
        return frozenset(names)


STATE = web.AppKey("guard_state", GuardState)
