"""The admin listener: probes and metrics without auth, ``/admin/*`` behind a bearer token.

``/admin/*`` is disabled (404) when no token is configured, so a deployment
that forgot the Secret does not expose an unauthenticated control plane.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guard_agent import __version__
from guard_agent.metrics import Metrics
from guard_agent.sessions.base import SessionRecord
from guard_agent.state import STATE, GuardState

__all__ = ["make_admin_app"]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def livez(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def readiness(state: GuardState) -> dict[str, bool]:
    """Each condition for serving; ``integrity`` waits for the first canary verdicts when canaries are set."""
    integrity = state.integrity
    return {
        "policy": state.policies.current is not None,
        "profile": state.settings.profile is None or state.profile.revision is not None,
        "upstream": state.upstream_ok,
        "integrity": integrity.ready,
        "accepting": not state.shutting_down,
    }


_NOT_READY = {
    "policy": "no policy loaded yet",
    "profile": "the detector profile is not loaded",
    "upstream": "the model server does not accept connections",
    "integrity": "waiting for the first integrity verdict",
    "accepting": "shutting down: draining in-flight requests",
}


def not_ready_reasons(state: GuardState, checks: dict[str, bool]) -> dict[str, str]:
    """One sentence per failing check, for people reading ``/readyz`` (probes only look at the status)."""
    reasons = {name: _NOT_READY[name] for name, ok in checks.items() if not ok}
    if "integrity" in reasons:
        reasons["integrity"] = state.integrity.waiting_reason() or reasons["integrity"]
    return reasons


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = readiness(state)
    ready = all(checks.values())
    # trackers that cannot work (no profile, a label-only model) are a reason to read, not to stop serving
    return _json({"ready": ready, "checks": checks, "reasons": not_ready_reasons(state, checks),
                  "inactive_trackers": dict(state.trackers.inactive())}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.active_sessions.set(state.sessions.size())
    set_inactive_trackers(state.metrics, state.trackers.inactive())
    if state.ops is not None:
        state.ops.refresh(readiness(state), state.profile.revision)
    resp = web.Response(body=generate_latest(state.metrics.registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def set_inactive_trackers(metrics: Metrics, inactive: Mapping[str, str]) -> None:
    """``inference_guard_tracker_inactive{score}`` = 1 for each inactive session score, nothing for the rest."""
    metrics.inactive_trackers.clear()
    for name in inactive:
        metrics.inactive_trackers.labels(name).set(1)


@web.middleware
async def _require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/admin/"):
        return await handler(request)
    token = request.app[STATE].settings.admin_token
    if not token:
        return _json({"error": {"code": "disabled", "message": "admin API disabled: no admin token configured"}}, 404)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _json({"error": {"code": "unauthorized", "message": "a valid bearer token is required"}}, 401)
    return await handler(request)


async def admin_reload(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok, error = state.reloader.policy("admin")
    if not ok:
        return _json({"error": {"code": "invalid_policy", "message": error}}, 422)
    policy = state.policies.current
    return _json({"revision": policy.revision, "source": policy.source, "warnings": list(state.policies.warnings)})


async def admin_policy(request: web.Request) -> web.Response:
    state = request.app[STATE]
    policy = state.policies.current
    return _json({"revision": policy.revision, "source": policy.source, "mode": policy.default.mode,
                  "rules": [r.id for r in policy.default.rules], "skipped_rules": list(policy.skipped_rules),
                  "models": sorted(policy.models), "warnings": list(state.policies.warnings),
                  "document": policy.document})


async def admin_session_get(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sid = request.match_info["session"]
    record = await _session_record(state, sid)
    if record is None:
        return _json({"error": {"code": "not_found", "message": "no such session"}}, 404)
    return _json(_record_dict(sid, record))


async def _session_record(state: GuardState, sid: str) -> SessionRecord | None:
    return await state.sessions.fetch(sid, time.time())  # the shared record (Redis), not this replica's copy


def _record_dict(sid: str, record: SessionRecord) -> dict[str, object]:
    return {"session": sid, "queries": record.queries, "first_seen": record.first_seen,
            "last_seen": record.last_seen, "blocked_rule": record.blocked_rule,
            "blocked_until": record.blocked_until, "scores": record.scores}


async def admin_session_unblock(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sid = request.match_info["session"]
    done = await state.sessions.unblock(sid)
    state.events.log("info", "session unblocked by operator", guard={"session": sid, "changed": done})
    return _json({"session": sid, "unblocked": done}, 200 if done else 404)


async def admin_session_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sid = request.match_info["session"]
    done = await state.sessions.delete(sid)
    state.events.log("info", "session reset by operator", guard={"session": sid, "changed": done})
    return _json({"session": sid, "reset": done}, 200 if done else 404)


def _samples(state: GuardState, prefix: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample whose name starts with ``prefix``, read from the guard's registry."""
    return [(s.name, s.labels, s.value) for metric in state.metrics.registry.collect()
            for s in metric.samples if s.name.startswith(prefix)]


def _sinks(state: GuardState) -> dict[str, dict[str, float]]:
    sinks: dict[str, dict[str, float]] = {}
    for name, labels, value in _samples(state, "inference_guard_sink_"):
        sink = sinks.setdefault(labels.get("sink", "?"), {})
        if name == "inference_guard_sink_events_total":
            sink[labels["state"]] = value
        elif name in ("inference_guard_sink_up", "inference_guard_sink_backlog_events",
                      "inference_guard_sink_spool_bytes", "inference_guard_sink_send_failures_total"):
            sink[name.removeprefix("inference_guard_sink_").removesuffix("_total")] = value
    return sinks


def _redis(state: GuardState) -> dict[str, object]:
    if not state.settings.redis_url:
        return {"configured": False}
    out: dict[str, object] = {"configured": True, "fallbacks": {}}
    fallbacks: dict[str, float] = {}
    for name, labels, value in _samples(state, "inference_guard_redis_"):
        if name == "inference_guard_redis_up":
            out["up"] = value == 1
        elif name == "inference_guard_redis_dirty_sessions":
            out["dirty_sessions"] = value
        elif name == "inference_guard_redis_fallbacks_total":
            reason = labels.get("reason", "?")
            fallbacks[reason] = fallbacks.get(reason, 0.0) + value
    out["fallbacks"] = fallbacks
    return out


def _counts(state: GuardState, name: str, label: str) -> dict[str, float]:
    return {labels.get(label, "?"): value for n, labels, value in _samples(state, name) if n == name}


async def admin_status(request: web.Request) -> web.Response:
    """Read-only: what an operator checks first in an incident (``guard-agent status`` prints it)."""
    state = request.app[STATE]
    checks = readiness(state)
    policy = state.policies.current
    return _json({
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started, 1),
        "ready": all(checks.values()), "checks": checks, "reasons": not_ready_reasons(state, checks),
        "policy": {"revision": policy.revision, "source": policy.source, "mode": policy.default.mode,
                   "reloads": _counts(state, "inference_guard_policy_reloads_total", "result"),
                   "warnings": list(state.policies.warnings)},
        "profile": {"revision": state.profile.revision, "configured": state.settings.profile is not None,
                    "reloads": _counts(state, "inference_guard_profile_reloads_total", "result")},
        "sessions": {"backend": state.sessions.backend, "local": state.sessions.size()},
        "redis": _redis(state),
        "sinks": _sinks(state),
        "in_flight": state.in_flight,
        "log_sample_allow": state.events.sample_allow,
    })


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=orjson.dumps({"error": {"code": "invalid_query",
                                                              "message": f"{name} must be an integer"}}).decode(),
                                 content_type="application/json") from None
    return min(high, max(low, value))


async def admin_decisions(request: web.Request) -> web.Response:
    """Read-only: decisions of the last ``minutes`` (1..60) by action and rule, the ``top`` sessions by risk."""
    state = request.app[STATE]
    minutes = _int_query(request, "minutes", 5, 1, 60)
    top = _int_query(request, "top", 10, 0, 100)
    if state.recent is None:
        return _json({"error": {"code": "unavailable", "message": "no decision history in this guard"}}, 404)
    summary = state.recent.summary(minutes, top)
    summary["minutes"] = minutes
    summary["log_sample_allow"] = state.events.sample_allow
    return _json(summary)


async def admin_decisions_log(request: web.Request) -> web.Response:
    """Read-only: the decisions still held for one session (``session=``) or a request's session
    (``request_id=``), oldest first, plus the session's stored record when it has one."""
    state = request.app[STATE]
    session, request_id = request.query.get("session"), request.query.get("request_id")
    if not session and not request_id:
        return _json({"error": {"code": "invalid_query", "message": "give session= or request_id="}}, 400)
    entries = state.recent.find(session=session, request_id=request_id) if state.recent is not None else []
    sid: str | None = session or next((e.session for e in entries if e.session), None)
    record = await _session_record(state, sid) if sid else None
    return _json({"session": sid, "decisions": [e.as_dict() for e in entries],
                  "record": _record_dict(sid, record) if sid and record is not None else None,
                  "held": state.recent.log.maxlen if state.recent is not None else 0})


def make_admin_app(state: GuardState) -> web.Application:
    app = web.Application(middlewares=[_require_token])
    app[STATE] = state
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_get("/admin/policy", admin_policy)
    app.router.add_get("/admin/status", admin_status)
    app.router.add_get("/admin/decisions", admin_decisions)
    app.router.add_get("/admin/decisions/log", admin_decisions_log)
    app.router.add_get("/admin/sessions/{session}", admin_session_get)
    app.router.add_post("/admin/sessions/{session}/unblock", admin_session_unblock)
    app.router.add_delete("/admin/sessions/{session}", admin_session_reset)
    return app
