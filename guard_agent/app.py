"""App factories and lifecycles: the guard app, the admin app and what they share."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from detectors.trackers import GlobalFingerprintIndex
from guard_agent.admin import make_admin_app, set_inactive_trackers
from guard_agent.auth import AuthError, JwtVerifier, KeyStore
from guard_agent.capture import make_capture
from guard_agent.contracts import ProfileSource
from guard_agent.events import EventLogger, EventSink
from guard_agent.identity import IdentityResolver
from guard_agent.integrity import make_integrity
from guard_agent.metrics import Metrics
from guard_agent.ops_metrics import OpsMetrics
from guard_agent.policy import PolicyError
from guard_agent.policy.model import BUILTIN_SCORES, Policy
from guard_agent.policy.store import PolicyStore
from guard_agent.profiles import ProfileStore
from guard_agent.protocols import ParseLimits
from guard_agent.proxy.upstream import lean_pool_for
from guard_agent.recent import RecentDecisions
from guard_agent.reloading import Reloader
from guard_agent.routes import RouteTable
from guard_agent.sessions.base import SessionStore
from guard_agent.sessions.memory import MemorySessionStore
from guard_agent.settings import ConfigError, Settings
from guard_agent.sinks import make_sink
from guard_agent.squeezing import SqueezeScorer
from guard_agent.state import STATE, GuardState, NoProfile
from guard_agent.tracking import SessionTracking

__all__ = ["build_state", "make_admin_app", "make_app"]


def build_state(settings: Settings, *, sink: EventSink | None = None) -> GuardState:
    """The whole guard, as ``guard-agent run`` serves it and the tests run it: everything that does not need a
    running loop. Raises on a bad first policy, profile or credential file (ConfigError for the latter),
    with the event sinks closed."""
    metrics = Metrics()
    recent = RecentDecisions(metrics.registry)
    events = EventLogger(_make_sink(settings, metrics, primary=sink), observer=recent,
                         sample_allow=settings.log_sample_allow, min_level=settings.log_level)
    try:
        return _assemble(settings, metrics, recent, events)
    except BaseException:  # a sink with a flush thread must not keep a process that never served alive
        events.close()
        raise


def _assemble(settings: Settings, metrics: Metrics, recent: RecentDecisions, events: EventLogger) -> GuardState:
    key = settings.hmac_key.encode() if settings.hmac_key else secrets.token_bytes(32)
    if not settings.hmac_key:
        events.log("warning", "no GUARD_HMAC_KEY set: using a random key, session ids change on restart "
                              "and differ between replicas")
    profile = _load_profile_source(settings, events, metrics)
    trackers = _tracker_hook(profile, key, settings,
                             on_inactive=lambda found: _report_inactive_trackers(events, metrics, found))
    _report_inactive_trackers(events, metrics, trackers.inactive())
    sessions: SessionStore
    if settings.redis_url:  # imported only here: redis is an optional extra
        from guard_agent.sessions.factory import make_global_observer, make_session_store

        sessions = make_session_store(settings, metrics=metrics, events=events, tracking=trackers)
        make_global_observer(settings, metrics=metrics, events=events, tracking=trackers)
    else:
        sessions = MemorySessionStore(max_sessions=settings.session_max, ttl=settings.session_ttl,
                                      on_evict=lambda reason: metrics.session_evictions.labels(reason).inc())
    # a first validation (a broken policy stops start-up here); compiled again below against every score
    # the assembled guard provides (squeezing, integrity), so no rule is skipped for a score it does have
    policies = PolicyStore(settings.policy, available_scores=BUILTIN_SCORES)
    keys, verifier = _load_credentials(settings, events)
    routes = RouteTable(custom=settings.routes, allowed=settings.allow_routes)
    state = GuardState(
        settings=settings,
        routes=routes,
        identity=IdentityResolver(key=key, header=settings.session_header, sources=settings.session_sources,
                                  trusted_proxies=settings.trusted_proxies, keys=keys, jwt=verifier),
        policies=policies,
        sessions=sessions,
        events=events,
        metrics=metrics,
        profile=profile,
        trackers=trackers,
        recent=recent,
        ops=OpsMetrics(metrics),
        credential_files=tuple((name, item) for name, item in (("api_keys", keys), ("jwks", verifier))
                               if item is not None),
    )
    state.parse_limits = ParseLimits(max_depth=settings.max_json_depth, max_rows=settings.max_batch_rows)
    state.async_scorers = (SqueezeScorer(state),)
    state.capture = make_capture(state)
    integrity = make_integrity(state)
    if integrity is not None:
        state.integrity = integrity
    state.reloader = Reloader(policies=policies, profile=profile, metrics=metrics, events=events,
                              available_scores=state.available_scores)
    policies.reload(available_scores=state.available_scores())
    for warning in policies.warnings:
        events.log("warning", f"policy: {warning}")
    metrics.policy_info.labels(policies.current.revision).set(1)
    # a policy that could harden answers on a route that cannot be hardened is accepted (the default policy
    # hardens), but said at start and whenever a reload activates such a policy: those requests are blocked
    policies.add_check(lambda policy: _warn_unhardenable(routes, events, policy))
    return state


def _load_credentials(settings: Settings, events: EventLogger) -> tuple[KeyStore | None, JwtVerifier | None]:
    """The API-key store and JWT verifier the settings name; ConfigError for a bad file."""
    s = settings
    try:
        keys = KeyStore(s.api_keys_file) if s.api_keys_file else None
        verifier = (JwtVerifier(s.jwt_jwks_file, issuer=s.jwt_issuer, audience=s.jwt_audience,
                                session_claim=s.jwt_session_claim) if s.jwt_jwks_file else None)
    except AuthError as exc:
        raise ConfigError(str(exc)) from exc
    if keys is not None:
        events.log("info", "api keys loaded", guard={"api_keys": len(keys)})
    return keys, verifier


def _warn_unhardenable(routes: RouteTable, events: EventLogger, policy: Policy) -> None:
    """A policy check that only warns: such a policy is accepted (the default policy hardens), and decide()
    blocks the requests it would harden on routes whose answers cannot be hardened."""
    try:
        routes.check_policy(policy)
    except PolicyError as exc:
        events.log("warning", "policy hardens on a route whose answers cannot be hardened: those requests "
                              "are blocked (403) instead", error={"message": exc.message})


def _make_sink(settings: Settings, metrics: Metrics, *, primary: EventSink | None = None) -> EventSink:
    """stdout (or ``primary``, a stand-in for stdout in tests and the demo), plus the configured SIEM sinks."""
    return make_sink(settings, metrics, primary=primary)


def _load_profile_source(settings: Settings, events: EventLogger, metrics: Metrics) -> ProfileSource:
    if not settings.profile:
        return NoProfile()
    store = ProfileStore(settings.profile)
    events.log("info", "profile loaded", guard={"profile_revision": store.revision,
                                                "scores": sorted(store.score_names)})
    metrics.profile_reloads.labels("ok").inc()
    return store


def _report_inactive_trackers(events: EventLogger, metrics: Metrics, inactive: Mapping[str, str]) -> None:
    """Say which session scores cannot work (at start, and whenever the model's answers change that)."""
    set_inactive_trackers(metrics, inactive)
    if inactive:
        events.log("warning", "session trackers inactive", guard={"inactive_trackers": dict(inactive)})


def _tracker_hook(profile: ProfileSource, key: bytes, settings: Settings,
                  on_inactive: Callable[[Mapping[str, str]], None]) -> SessionTracking:
    # a derived salt: the fingerprint hashes never use the session-id key itself, and any key length works
    salt = hashlib.sha256(b"inference-guard/fingerprint-salt\x00" + key).digest()
    index = GlobalFingerprintIndex(max_entries=settings.global_max_entries, window_s=settings.global_window,
                                   m_half=settings.global_half_count)
    return SessionTracking.from_profile(profile, salt=salt, global_index=index, on_inactive=on_inactive)


async def _session_store(app: web.Application) -> AsyncIterator[None]:
    """Close a shared store's connections last (cleanup runs in reverse order)."""
    yield
    await app[STATE].sessions.aclose()


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    s = state.settings
    connector = aiohttp.TCPConnector(limit=s.upstream_pool_size, keepalive_timeout=30, ttl_dns_cache=300)
    # no `connect` timeout: in aiohttp it includes waiting for a pool slot, which would turn the guard's own
    # overload into "504 upstream too slow"; sock_connect bounds the TCP connect itself
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=s.connect_timeout,
                                    sock_read=s.read_timeout)
    state.client = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                         cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))
    state.upstream = lean_pool_for(s.upstream, size=s.upstream_pool_size, connect_timeout=s.connect_timeout,
                                   read_timeout=s.read_timeout)
    yield
    if state.upstream is not None:
        state.upstream.close()
    await state.client.close()


async def _upstream_prober(app: web.Application) -> AsyncIterator[None]:
    """Readiness needs a reachable model: a TCP connect every couple of seconds."""
    state = app[STATE]
    parts = urlsplit(state.settings.upstream)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)

    async def probe_once() -> None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), state.settings.connect_timeout)
        except (TimeoutError, OSError):
            state.upstream_ok = False
            return
        state.upstream_ok = True
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def loop() -> None:
        while True:
            await probe_once()
            await asyncio.sleep(0.5 if not state.upstream_ok else 2.0)

    await probe_once()
    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _file_watcher(app: web.Application) -> AsyncIterator[None]:
    """Poll the policy's and the profile's file identities (survives ConfigMap ``..data`` symlink swaps)."""
    state = app[STATE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(state.settings.reload_interval)
            state.reloader.watch()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(state: GuardState) -> web.Application:
    """The guard listener's application: its state and its lifecycle (``cleanup_ctx``), run by
    ``server.GuardRunner``, which gives every request to ``proxy.handle`` (the route table decides).

    The integrity checks and the capture run their background work as ``cleanup_ctx`` entries (see
    ``contracts.Lifecycle``), started after the upstream client exists.
    """
    app = web.Application()
    app[STATE] = state
    app.cleanup_ctx.append(_session_store)
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_upstream_prober)
    app.cleanup_ctx.append(_file_watcher)
    app.cleanup_ctx.append(state.integrity.cleanup_ctx)
    if state.capture is not None:
        app.cleanup_ctx.append(state.capture.cleanup_ctx)
    return app
