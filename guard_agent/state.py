"""Shared state of one guard process, behind typed aiohttp AppKeys, and the null objects that stand in for
components a guard runs without (the seams are the Protocols of ``guard_agent.contracts``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
from aiohttp import web

from detectors import Profile
from detectors.text import TextModel
from guard_agent.contracts import AsyncScorer, Capture, Integrity, ProfileSource, Reloadable, Trackers
from guard_agent.events import EventLogger
from guard_agent.identity import IdentityResolver
from guard_agent.metrics import Metrics
from guard_agent.ops_metrics import OpsMetrics
from guard_agent.policy.store import PolicyStore
from guard_agent.protocols import ParsedResponse, ParseLimits
from guard_agent.recent import RecentDecisions
from guard_agent.routes import RouteTable
from guard_agent.scoring import ScoringContext
from guard_agent.sessions.base import SessionRecord, SessionStore
from guard_agent.settings import Settings

if TYPE_CHECKING:
    from guard_agent.proxy.upstream import UpstreamPool
    from guard_agent.reloading import Reloader

__all__ = ["STATE", "GuardState", "NoIntegrity", "NoProfile", "NoTrackers"]


class NoProfile:
    """The ``ProfileSource`` of a guard without ``GUARD_PROFILE``: built-in checks only, nothing to reload."""

    revision: str | None = None
    score_names: frozenset[str] = frozenset()
    profiles: Mapping[str, Profile] = MappingProxyType({})

    def expected_features(self, model: str | None) -> int | None:
        return None

    def profile_for(self, model: str | None) -> Profile | None:
        return None

    def text_model(self, model: str | None) -> TextModel | None:
        return None

    def score(self, ctx: ScoringContext) -> Mapping[str, float]:
        return {}

    async def score_batched(self, ctx: ScoringContext) -> Mapping[str, float]:
        return {}

    def changed_on_disk(self) -> bool:
        return False

    def reload(self) -> None:
        return None


class NoTrackers:
    """The ``Trackers`` of a guard without session trackers: no session scores, no state to store."""

    score_names: frozenset[str] = frozenset()

    async def peek(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
                   now: float) -> Mapping[str, float]:
        return {}

    async def update(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
                     response: ParsedResponse | None, now: float,
                     scores: Mapping[str, float]) -> Mapping[str, float]:
        return {}

    def inactive(self) -> Mapping[str, str]:
        return {}

    def encode_state(self, held: Any) -> bytes | None:
        return None

    def decode_state(self, data: bytes) -> Any:
        raise ValueError("no session trackers configured")


class NoIntegrity:
    """The ``Integrity`` of a guard without canaries or signed model files: never a verdict, always ready."""

    score_names: frozenset[str] = frozenset()
    ready = True

    def score(self, model: str | None) -> float | None:
        return None

    def waiting_reason(self) -> str | None:
        return None

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        yield


@dataclass
class GuardState:
    settings: Settings
    routes: RouteTable
    identity: IdentityResolver
    policies: PolicyStore
    sessions: SessionStore
    events: EventLogger
    metrics: Metrics
    profile: ProfileSource = field(default_factory=NoProfile)
    trackers: Trackers = field(default_factory=NoTrackers)
    integrity: Integrity = field(default_factory=NoIntegrity)
    capture: Capture | None = None
    async_scorers: tuple[AsyncScorer, ...] = ()
    client: aiohttp.ClientSession | None = None
    upstream: UpstreamPool | None = None  # the inference call's own client (plain http:// upstreams)
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
        """Every score name this guard can produce: what a policy rule may name without being skipped."""
        from guard_agent.policy.model import BUILTIN_SCORES

        names = BUILTIN_SCORES | self.profile.score_names | self.trackers.score_names | self.integrity.score_names
        for scorer in self.async_scorers:
            names |= scorer.provides
        return names


STATE = web.AppKey("guard_state", GuardState)
