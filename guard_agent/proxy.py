"""The request path: route, parse, score, decide, forward, harden, log.

One handler serves every path (a catch-all route): the guard's own route table
decides what is an inference route, a read-only passthrough or refused, on the
raw (undecoded) path, so aiohttp's router never normalises a path we would
rather refuse. The upstream receives exactly the bytes that were scored.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from guard_agent.events import build_decision_event, random_id
from guard_agent.identity import Identity
from guard_agent.llm import (
    OPENAI_PROTOCOLS,
    Usage,
    account,
    carried,
    harden_llm_chunk,
    harden_llm_request,
    llm_session_facts,
    relay_sse,
    usage_of,
)
from guard_agent.policy.decide import INTEGRITY_RULE, RequestFacts, SessionFacts, decide
from guard_agent.policy.model import Decision, EffectivePolicy, Policy, RateLimit
from guard_agent.protocols import (
    HARDENABLE_PROTOCOLS,
    ParsedRequest,
    ProtocolError,
    harden_document,
    parse_document,
    parse_request,
    read_response,
)
from guard_agent.protocols import (
    Hardening as WireHardening,
)
from guard_agent.ratelimit import cooldown_start, rate_check
from guard_agent.routes import RouteMatch
from guard_agent.scoring import (
    InputSchemaError,
    ScoringContext,
    check_input,
    declared_schema_score,
    representable,
    run_scorers,
    saturate_detector_scores,
)
from guard_agent.sessions.base import SessionRecord
from guard_agent.state import STATE, GuardState
from guard_agent.text_scoring import project_texts, text_check_scores

__all__ = ["HOP_BY_HOP", "error_response", "handle", "refuse_early"]

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Proxy-Connection",
))
# Expect is answered by the guard itself (the body is read whole before anything is forwarded): forwarded, it
# would make the upstream client wait for a "100 Continue" the model server may never send
_NOT_FORWARDED = HOP_BY_HOP | {"expect"}
_DIGITS = re.compile(r"[0-9]+")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BLOCK_MESSAGE = "request refused by policy"


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """The JSON error body of DESIGN.md, with the request id echoed."""
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    hdrs = {"X-Request-Id": request_id, **(headers or {})}
    return web.Response(status=status, body=body, content_type="application/json", headers=hdrs)


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.match(given) else random_id()


def refuse_early(state: GuardState, request: web.BaseRequest, status: int, code: str, message: str) -> web.Response:
    """A request refused before routing (headers too large, a head aiohttp's parser refused, a handler that
    failed): the JSON error with a validated request id (never the client's unchecked value), one decision
    event and the request counters, like every other request. ``message`` is the guard's, never client bytes."""
    started = time.perf_counter()
    request_id = _request_id(request)
    out = _Outcome()
    out.rule = code
    out.source_ip = request.remote
    response = _reject(state, out, status, code, message, request_id)
    response.force_close()
    out.status = status
    _emit(state, request, state.policies.current, out, request_id, started)
    state.metrics.requests_by("refused", out.action, str(status)).inc()
    return response


# the headers the guard parsed and decided with: the upstream must read the body the same way, so naming one in
# ``Connection`` (which makes it hop-by-hop) does not remove it (``Connection: close, Content-Type`` would
# otherwise forward a JSON body as application/octet-stream)
_DECIDED_WITH = frozenset({"content-type", "content-encoding", "inference-header-content-length", "authorization"})


def _upstream_headers(headers: CIMultiDictProxy[str], peer: str | None, request_id: str,
                      session_header: str) -> CIMultiDict[str]:
    decided_with = _DECIDED_WITH | {session_header.lower()}
    connection_tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")
                         if t.strip()} - decided_with
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in _NOT_FORWARDED or lname in connection_tokens:
            continue
        out.add(name, value)
    prior = headers.get("X-Forwarded-For")
    if peer:
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Request-Id"] = request_id
    return out


def _client_headers(headers: Mapping[str, str], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    out["X-Request-Id"] = request_id
    return out


class _Outcome:
    """Collects what one request did, for the single decision event at the end."""

    __slots__ = (
        "action",
        "enforced",
        "features",
        "fields",
        "model",
        "outcome",
        "rows",
        "rule",
        "scores",
        "session",
        "source_ip",
        "status",
        "technique",
    )

    def __init__(self) -> None:
        self.action = "allow"
        self.outcome = "success"
        self.rule = "default"
        self.status = 0
        self.session: str | None = None
        self.model: str | None = None
        self.rows = 0
        self.scores: dict[str, float] = {}
        self.source_ip: str | None = None
        self.technique: str | None = None
        self.enforced = True
        self.fields: dict[str, Any] = {}
        self.features: np.ndarray | None = None


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    request_id = _request_id(request)
    match = state.routes.match(request.method, request.raw_path)
    out = _Outcome()
    out.model = match.model
    state.in_flight += 1
    upstream_time = 0.0
    try:
        if request.version not in _HTTP1:
            response: web.StreamResponse = _unsupported_version(state, out, request, request_id)
        elif match.kind == "invalid":
            response = _reject(state, out, 400, "invalid_path", match.reason, request_id)
        elif match.kind == "denied":
            out.rule = "route-not-allowed"
            response = _reject(state, out, 403, "route_not_allowed", "route not allowed", request_id)
        elif match.kind == "passthrough":
            out.rule = "passthrough"
            response, upstream_time = await _passthrough(request, state, match, out, request_id)
        else:
            response, upstream_time = await _inference(request, state, match, out, request_id)
    except BadBody as exc:
        out.rule = "invalid-input"
        response = _reject(state, out, 400, "invalid_input", str(exc), request_id)
    except SlowClient:
        response = _reject(state, out, 408, "request_timeout", "the request body was not received in time",
                           request_id, {"Connection": "close"})
    except ClientGone:  # 499 as nginx logs it: the event says what happened; the answer reaches no one
        response = _reject(state, out, 499, "client_closed", "the client closed the connection mid-body",
                           request_id, {"Connection": "close"})
    finally:
        state.in_flight -= 1
    out.status = response.status
    policy = state.policies.current
    _emit(state, request, policy, out, request_id, started)
    metrics = state.metrics
    metrics.requests_by(match.route, out.action, str(out.status)).inc()
    metrics.overhead_by(match.route).observe(max(0.0, time.perf_counter() - started - upstream_time))
    return response


_HTTP1 = frozenset({aiohttp.HttpVersion10, aiohttp.HttpVersion11})


def _unsupported_version(state: GuardState, out: _Outcome, request: web.Request, request_id: str) -> web.Response:
    """400 for a request line naming another HTTP version (``HTTP/2.0`` over a plain HTTP/1 connection): a client
    error like any malformed request line (DESIGN.md's statuses), not a fault of the guard's.

    aiohttp would answer in the request's own version (``HTTP/2.0 200`` in HTTP/1 framing), so the answer is
    written here as HTTP/1.1 and the connection closed; the response returned is for the event (aiohttp's own
    write of it meets the closed transport and is dropped)."""
    response = _reject(state, out, 400, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served",
                       request_id)
    transport = request.transport
    if transport is not None and not transport.is_closing():
        body = response.body if isinstance(response.body, bytes) else b""
        transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nX-Request-Id: " + request_id.encode() +
                        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()
    return response


def _reject(state: GuardState, out: _Outcome, status: int, code: str, message: str,
            request_id: str, headers: Mapping[str, str] | None = None) -> web.Response:
    out.action, out.outcome = "reject", "failure"
    if out.rule == "default":
        out.rule = code
    state.metrics.rejects.labels(code).inc()
    return error_response(status, code, message, request_id, headers)


def _emit(state: GuardState, request: web.BaseRequest, policy: Policy, out: _Outcome, request_id: str,
          started: float) -> None:
    keep = state.events.keep(out.action)
    if not keep and (state.capture is None or out.features is None):
        return  # a sampled-out allow event that nothing captures: do not build it at all
    eff = policy.for_model(out.model)
    fields = build_decision_event(
        action=out.action, outcome=out.outcome, rule=out.rule, mode=eff.mode,
        enforced=out.enforced if eff.mode == "enforce" else False,
        session=out.session, model=out.model, rows=out.rows, scores=out.scores,
        policy_revision=policy.revision, profile_revision=state.profile.revision,
        request_id=request_id, method=request.method, status=out.status, path=raw_target_path(request),
        source_ip=out.source_ip, technique=out.technique, started=started, extra_guard=out.fields,
    )
    if state.capture is not None and out.features is not None:
        state.capture.record(fields, out.features, scores=out.scores)  # unsampled, before allow sampling
    if keep:
        level = "warning" if out.action in ("block", "throttle", "integrity_violation") or out.status >= 500 \
            else "info"
        state.events.write(fields, f"{out.action} {request.method} {fields['url']['path']}", level=level)


_MAX_LOGGED_PATH = 1024


def raw_target_path(request: web.BaseRequest) -> str:
    """The path as the client sent it (``%2F`` stays ``%2F``), without the query string (which may carry keys),
    cut at 1 KiB: SIEM rules must see the spelling that was refused, not aiohttp's decoded form."""
    return request.raw_path.partition("?")[0][:_MAX_LOGGED_PATH]


class SlowClient(Exception):
    """The client did not send its body within the read timeout."""


class ClientGone(Exception):
    """The client closed the connection before its whole body arrived: nothing to score, nobody to answer."""


class BadBody(Exception):
    """The body cannot be read as sent (bad framing, or an encoding the guard will not decode)."""


async def _read_body(request: web.Request, limit: int, timeout: float) -> bytes | None:
    """The whole body, or None when it exceeds ``limit`` (checked before and while reading)."""
    # every Content-Encoding header and every token of each: aiohttp decompresses by one of them while a model
    # server may read another, so anything but identity (in any position, repeated or listed) is refused
    encodings = [t.strip().lower() for v in request.headers.getall("Content-Encoding", ()) for t in v.split(",")]
    if any(c not in ("", "identity") for c in encodings):
        # aiohttp would decompress it; the guard refuses instead of scoring bytes other than those forwarded
        shown = ", ".join(encodings)[:48]
        raise BadBody(f"unsupported Content-Encoding {shown!r}: send an uncompressed body")
    codings = ",".join(request.headers.getall("Transfer-Encoding", ())).strip().lower()
    if codings not in ("", "chunked"):
        # aiohttp decodes only the chunked framing; any other transfer-coding would be forwarded undecoded
        raise BadBody("unsupported Transfer-Encoding: only chunked framing is accepted")
    if request.content_length is not None and request.content_length > limit:
        return None
    content = request.content
    if content.is_eof():  # the whole body came with the head (the usual small request): no timer, no iterator
        try:
            body = content.read_nowait(-1)
        except aiohttp.web_protocol.RequestPayloadError as exc:
            raise BadBody("the request body could not be read (malformed framing)") from exc
        return body if len(body) <= limit else None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
    except TimeoutError as exc:
        raise SlowClient from exc
    except ConnectionResetError as exc:
        raise ClientGone from exc
    except aiohttp.web_protocol.RequestPayloadError as exc:
        raise BadBody("the request body could not be read (malformed framing)") from exc
    return b"".join(chunks)


async def _call_upstream(state: GuardState, request: web.Request, body: bytes | None,
                         request_id: str, *, readable: bool = False,
                         strip_query: bool = False) -> aiohttp.ClientResponse:
    """Forward to the model; ``readable`` asks for an uncompressed answer the guard can parse and harden."""
    assert state.client is not None
    target = request.raw_path.partition("?")[0] if strip_query else request.raw_path
    url = state.settings.upstream.rstrip("/") + target
    headers = _upstream_headers(request.headers, request.remote, request_id, state.settings.session_header)
    if readable:
        headers["Accept-Encoding"] = "identity"
    async with asyncio.timeout(_upstream_deadline(state)):  # a pool slot, the connect and the answer's head
        return await state.client.request(request.method, url, data=body, allow_redirects=False,
                                          auto_decompress=False, headers=headers)


def _upstream_deadline(state: GuardState) -> float:
    """The longest the guard waits on the upstream for one step (the head, or a whole inference answer).

    aiohttp's ``sock_read`` only bounds the gap between two reads and nothing bounds the wait for a pool slot:
    a model server that never answers (or waits for a ``100 Continue``) would otherwise hold a connection and
    every request queued behind it forever.
    """
    return state.settings.connect_timeout + state.settings.read_timeout


def _upstream_failure(state: GuardState, out: _Outcome, exc: BaseException, request_id: str) -> web.Response:
    """502/504; the event says the request failed and why (``guard.upstream_error``), at warning level."""
    out.outcome = "failure"
    if isinstance(exc, asyncio.TimeoutError):
        state.metrics.upstream_errors.labels("timeout").inc()
        out.fields["upstream_error"] = "timeout"
        return error_response(504, "upstream_timeout", "the model server did not answer in time", request_id)
    state.metrics.upstream_errors.labels(type(exc).__name__).inc()
    out.fields["upstream_error"] = _upstream_reason(exc)
    return error_response(502, "upstream_unavailable", "the model server is unreachable or broken", request_id)


def _upstream_reason(exc: BaseException) -> str:
    """The exception's type and, for a refused or reset connection, the OS reason (never response bytes)."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else None
    if cause is not None and cause.errno:
        return f"{type(exc).__name__}: {os.strerror(cause.errno).lower()}"
    return type(exc).__name__


def _access_refusal(state: GuardState, out: _Outcome, identity: Identity, eff: EffectivePolicy,
                    request_id: str, *, model_required: bool, health: bool = False) -> web.Response | None:
    """401 without valid credentials when the policy requires them (on a plain ``health`` route only when it
    asks for that too); 403 for a model outside the credential's list (``model_required``: also when the route
    names no model). None when the request may go on."""
    if identity.credential_error is not None:
        out.fields["credential_error"] = identity.credential_error
    if identity.principal is not None:
        out.fields["principal"] = identity.principal
    if eff.credentials_required(health=health) and not identity.authenticated:
        out.rule = "credentials-required"
        return _reject(state, out, 401, "unauthorized", "a valid API key or bearer token is required", request_id,
                       {"WWW-Authenticate": 'Bearer realm="inference-guard"'})
    if identity.models is not None and (model_required or out.model is not None) and out.model not in identity.models:
        out.rule = "model-not-allowed"
        return _reject(state, out, 403, "model_not_allowed", "this credential may not call this model", request_id)
    return None


async def _passthrough(request: web.Request, state: GuardState, match: RouteMatch, out: _Outcome,
                       request_id: str) -> tuple[web.StreamResponse, float]:
    identity = state.identity.resolve(request.headers, request.remote)
    out.session, out.source_ip = identity.session, identity.address
    # unscored is not unauthenticated: model metadata needs the same credentials as inference; plain health stays
    # open for probes unless the policy's access.health_requires_credentials says otherwise
    refusal = _access_refusal(state, out, identity, state.policies.current.for_model(out.model), request_id,
                              model_required=False, health=match.health)
    if refusal is not None:
        return refusal, 0.0
    if request.method not in ("GET", "HEAD") and (request.content_length or request.can_read_body):
        body = await _read_body(request, state.settings.max_body_bytes, state.settings.client_read_timeout)
        if body is None:
            return _reject(state, out, 413, "body_too_large", "request body too large", request_id), 0.0
    else:
        body = None
    t0 = time.perf_counter()
    try:
        upstream = await _call_upstream(state, request, body, request_id)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return _upstream_failure(state, out, exc, request_id), time.perf_counter() - t0
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=_client_headers(upstream.headers, request_id))
        if upstream.headers.get("Content-Length") is not None:
            response.content_length = int(upstream.headers["Content-Length"])
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
        except (TimeoutError, aiohttp.ClientError, ConnectionResetError) as exc:
            state.metrics.upstream_errors.labels(type(exc).__name__).inc()
            out.outcome = "failure"
            if request.transport is not None:  # the client must not take a truncated body for a whole one
                request.transport.close()
    state.metrics.upstream_latency_by("passthrough").observe(time.perf_counter() - t0)
    return response, time.perf_counter() - t0


async def _inference(request: web.Request, state: GuardState, match: RouteMatch, out: _Outcome,
                     request_id: str) -> tuple[web.StreamResponse, float]:
    """One scored request, top-down: admit → score and decide → answer (refuse, or forward, learn, harden);
    the session records are written once, at the end, whatever the answer."""
    admitted = await _admit(request, state, match, out, request_id)
    if isinstance(admitted, web.Response):
        return admitted, 0.0  # refused before any session was read: nothing to write
    verdict = await _score_and_decide(request, state, admitted, out)
    response, upstream_time = await _answer(request, state, admitted, verdict, out, request_id)
    await admitted.sessions.save(state, admitted.now)
    return response, upstream_time


@dataclass(slots=True)
class _Admitted:
    """A request that passed access, body and schema checks, with its session records read and its rate
    limit taken: everything the decision needs besides the scores."""

    now: float
    match: RouteMatch
    eff: EffectivePolicy
    identity: Identity
    body: bytes
    parsed: ParsedRequest
    features: np.ndarray  # clipped to float32's range: what the detectors and the trackers score
    beyond_range: bool
    strip_query: bool
    sessions: _Sessions
    request_facts: RequestFacts
    session_facts: SessionFacts


@dataclass(slots=True)
class _Verdict:
    """The decision on an admitted request and the scores it was made on."""

    decision: Decision
    scores: dict[str, float]


async def _admit(request: web.Request, state: GuardState, match: RouteMatch, out: _Outcome,
                 request_id: str) -> _Admitted | web.Response:
    """Identity and access, the query rule, the body, parsing and the input schema, then the session records
    with their cool-down and rate limit (``ratelimit.rate_check``, as the replay); a refusal is the 4xx."""
    settings = state.settings
    now = time.time()
    identity = state.identity.resolve(request.headers, request.remote)
    out.session, out.source_ip = identity.session, identity.address
    eff = state.policies.current.for_model(match.model)
    out.enforced = eff.mode == "enforce"
    refusal = _access_refusal(state, out, identity, eff, request_id, model_required=True)
    if refusal is not None:
        return refusal
    has_query = "?" in request.raw_path
    if has_query and eff.input.query == "refuse":
        out.rule = "query-not-allowed"
        return _reject(state, out, 400, "invalid_input", "a query string is not accepted on this route "
                       "(policy input.query)", request_id)
    body = await _read_body(request, settings.max_body_bytes, settings.client_read_timeout)
    if body is None:
        return _reject(state, out, 413, "body_too_large", f"request body exceeds {settings.max_body_bytes} bytes",
                       request_id)
    try:
        parsed = _parse(request, state, match, body)
        out.rows = parsed.rows
        parsed = project_texts(state.profile, parsed, match.model)
        check_input(parsed.features, eff.input, expected_features=state.profile.expected_features(match.model))
    except (ProtocolError, InputSchemaError) as exc:
        out.rule = "invalid-input"
        return _reject(state, out, 400, "invalid_input", str(exc), request_id)
    features, beyond_range = representable(parsed.features)

    sessions = await _Sessions.load(state, identity, now)
    if len(sessions.entries) > 1:  # the address's session counts too: name it, so an operator can reset it
        out.fields["address_session"] = sessions.entries[1][0]
    record = sessions.record
    rate_limited, retry_after = sessions.take(now, identity.rate_limit or eff.rate_limit)
    request_facts = RequestFacts(model=match.model, protocol=parsed.protocol, rows=parsed.rows,
                                 body_bytes=len(body), features=int(parsed.features.shape[1]),
                                 source_ip=identity.ip, properties=parsed.properties)
    session_facts = SessionFacts(id=identity.session, source=identity.source, queries=sessions.queries,
                                 age_seconds=now - record.first_seen, blocked_rule=sessions.blocked(now),
                                 rate_limited=rate_limited, retry_after=retry_after,
                                 usage=llm_session_facts(record.scores) if parsed.protocol in OPENAI_PROTOCOLS else {})
    return _Admitted(now=now, match=match, eff=eff, identity=identity, body=body, parsed=parsed, features=features,
                     beyond_range=beyond_range, strip_query=has_query and eff.input.query == "strip",
                     sessions=sessions, request_facts=request_facts, session_facts=session_facts)


def _parse(request: web.Request, state: GuardState, match: RouteMatch, body: bytes) -> ParsedRequest:
    return parse_request(
        match.protocol or "v2", body, content_type=request.headers.get("Content-Type"),
        content_encoding=request.headers.get("Content-Encoding"), pointer=match.pointer,
        limits=state.parse_limits,
        inference_header_length=_header_length(request.headers.getall("Inference-Header-Content-Length", [])),
    )


async def _score_and_decide(request: web.Request, state: GuardState, a: _Admitted, out: _Outcome) -> _Verdict:
    """The decision, recorded in the event and in the session records (query count, a cool-down it starts)."""
    verdict = await _decide(request, state, a, out)
    decision, scores = verdict.decision, verdict.scores
    if decision.unhardenable:  # decide() turned a harden into a block: this route's answers have no known shape
        out.fields["hardening"] = "unsupported"
    out.scores, out.action, out.rule, out.technique = scores, decision.action, decision.rule, decision.technique
    if decision.matched:
        out.fields["matched_rules"] = list(decision.matched)
    record = a.sessions.record
    out.fields.update(protocol=a.parsed.protocol, body_bytes=len(a.body), features=int(a.parsed.features.shape[1]),
                      session_source=a.identity.source, session_queries=a.sessions.queries,
                      session_age_seconds=round(a.now - record.first_seen, 3))
    out.features = a.features
    a.sessions.block(decision, a.eff, a.now)
    a.sessions.count(a.parsed.rows)
    score_metric = state.metrics.scores_by
    for name, value in scores.items():
        score_metric(name).observe(value)
    return verdict


async def _decide(request: web.Request, state: GuardState, a: _Admitted, out: _Outcome) -> _Verdict:
    """A blocked or throttled session is refused before any scoring (refusals must stay cheap under abuse);
    every other request is scored, then decided."""
    facts = a.session_facts
    if a.eff.mode == "enforce" and (facts.blocked_rule is not None or facts.rate_limited):
        early = decide(a.request_facts, {}, facts, a.eff)
        if early.refused:
            return _Verdict(early, {})
    scores, failure = await _scores(request, state, a, out)
    return _Verdict(decide(a.request_facts, scores, facts, a.eff, scoring_failure=failure), scores)


async def _scores(request: web.Request, state: GuardState, a: _Admitted,
                  out: _Outcome) -> tuple[dict[str, float], Literal["error", "budget"] | None]:
    """Every score the policy may read: the stateless scorers (detectors within the budget), the model's
    integrity and, when a rule reads them, the session trackers' (the worse of the request's two sessions)."""
    model = a.match.model
    ctx = ScoringContext(features=a.features, row_shape=a.parsed.row_shape, model=model,
                         protocol=a.parsed.protocol, body=a.body, policy=a.eff,
                         extra={"request": request, "parsed": a.parsed})
    scores, failure = await run_scorers(ctx, (_declared_scorer, _text_scorer),
                                        state.async_scorers if a.eff.squeeze.enabled else (),
                                        batched=state.profile.score_batched)
    if a.beyond_range:  # a value the detectors cannot represent is as far out as it gets, never an error
        out.fields["beyond_float32"] = True
        if state.profile.expected_features(model) is not None:
            saturate_detector_scores(scores, state.profile.score_names)
    if failure is not None:
        state.metrics.scoring_failures.labels(failure).inc()
        out.fields["scoring_failure"] = failure
    integrity = state.integrity.score(model)
    if integrity is not None:
        scores["integrity.canary"] = integrity
    if a.eff.needs_session_scores:  # the trackers cost more than all detectors together: only when read
        scores.update(await a.sessions.peek(state, a.features, model, a.now))
    return scores, failure


async def _answer(request: web.Request, state: GuardState, a: _Admitted, verdict: _Verdict, out: _Outcome,
                  request_id: str) -> tuple[web.StreamResponse, float]:
    """The refusal the decision calls for, or the model's answer: forwarded, learnt from, hardened."""
    decision = verdict.decision
    if decision.refused:
        out.outcome = "failure"
        return _refusal(decision, request_id), 0.0
    if a.parsed.protocol in OPENAI_PROTOCOLS:
        return await _llm_forward(request, state, a, verdict, out, request_id)
    t0 = time.perf_counter()
    try:
        upstream = await _call_upstream(state, request, a.body, request_id, readable=True,
                                        strip_query=a.strip_query)
        async with upstream, asyncio.timeout(_upstream_deadline(state)):
            payload = await upstream.read()
            status, reason, headers = upstream.status, upstream.reason, upstream.headers
    except (TimeoutError, aiohttp.ClientError) as exc:
        return _upstream_failure(state, out, exc, request_id), time.perf_counter() - t0
    upstream_time = time.perf_counter() - t0
    state.metrics.upstream_latency_by(a.match.route).observe(upstream_time)
    if 200 <= status < 300:
        answered = await _learn_and_harden(state, a, verdict, payload, out)
        if answered is None:  # never leak the full answer because it could not be degraded
            out.outcome = "failure"
            return error_response(502, "hardening_failed", "the model's answer could not be hardened",
                                  request_id), upstream_time
        payload = answered
    return web.Response(status=status, reason=reason, body=payload,
                        headers=_client_headers(headers, request_id)), upstream_time


def _refusal(decision: Decision, request_id: str) -> web.Response:
    """503 while the model fails its integrity check, 429 (with ``Retry-After``) to a throttle, else 403."""
    if decision.rule == INTEGRITY_RULE:
        return error_response(503, "integrity_violation",
                              "the model failed its integrity check; requests are refused until it passes",
                              request_id)
    if decision.action == "throttle":
        retry = str(max(1, int(np.ceil(decision.retry_after or 1.0))))
        return error_response(429, "throttled", "too many requests", request_id, {"Retry-After": retry})
    return error_response(403, "blocked", _BLOCK_MESSAGE, request_id)


async def _learn_and_harden(state: GuardState, a: _Admitted, verdict: _Verdict, payload: bytes,
                            out: _Outcome) -> bytes | None:
    """The trackers learn the model's answer; the answer as the client gets it (hardened when the decision
    says so), None when it could not be hardened.

    The answer is decoded once, for the trackers and the hardening alike, and only when its shape is known:
    ``parse_document`` and ``harden_document`` read exactly the hardenable protocols (a custom route's is
    opaque)."""
    protocol = a.parsed.protocol
    hardening = _wire_hardening(verdict.decision)
    readable = protocol in HARDENABLE_PROTOCOLS
    learn = a.eff.needs_session_scores
    doc = read_response(payload) if readable and (learn or hardening is not None) else None
    if learn:
        answered = parse_document(protocol, doc, a.parsed.rows)  # None without doc
        await a.sessions.learn(state, a.features, a.match.model, answered, a.now, verdict.scores)
    if hardening is None:
        return payload
    hardened = harden_document(protocol, doc, hardening)
    out.fields["hardening"] = "failed" if hardened is None else "applied"
    return hardened


class _Sessions:
    """The request's session record and, for an unverified credential, its client address's record too.

    Without a key store anyone can invent keys, so each such request also counts against (and is refused by) the
    address's session: its bucket, its trackers and its block. Both records are read once and written once.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[str, SessionRecord]]) -> None:
        self.entries = entries

    @classmethod
    async def load(cls, state: GuardState, identity: Identity, now: float) -> _Sessions:
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


async def _llm_forward(request: web.Request, state: GuardState, a: _Admitted, verdict: _Verdict, out: _Outcome,
                       request_id: str) -> tuple[web.StreamResponse, float]:
    """OpenAI-compatible routes: a hardened request loses its logit_bias; streamed answers are relayed chunk by
    chunk; the usage goes into the event; the trackers learn the prompt (the answer has no class to learn)."""
    parsed, record = a.parsed, a.sessions.record
    hardening = _wire_hardening(verdict.decision)
    body = a.body
    if hardening is not None:
        body = harden_llm_request(body, hardening)
        out.fields["hardening"] = "applied"
    t0 = time.perf_counter()
    try:
        upstream = await _call_upstream(state, request, body, request_id, readable=True)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return _upstream_failure(state, out, exc, request_id), time.perf_counter() - t0
    async with upstream:
        headers = _client_headers(upstream.headers, request_id)
        if parsed.properties.get("request.stream") and upstream.status == 200:
            response, usage, complete = await relay_sse(request, upstream, headers, hardening)
            if not complete:
                out.outcome = "failure"
        else:
            payload = await upstream.read()
            doc = read_response(payload) if upstream.status == 200 else None
            usage = usage_of(doc) or Usage(counted=True)
            if hardening is not None and doc is not None:
                hardened = harden_llm_chunk(payload, hardening)
                if hardened is None:
                    out.outcome, out.fields["hardening"] = "failure", "failed"
                    return error_response(502, "hardening_failed", "the model's answer could not be hardened",
                                          request_id), time.perf_counter() - t0
                payload = hardened
            response = web.Response(status=upstream.status, reason=upstream.reason, body=payload, headers=headers)
    upstream_time = time.perf_counter() - t0
    out.fields["llm"] = usage.as_fields()
    kept = account(record.scores, parsed, usage) if upstream.status == 200 else carried(record.scores)
    if a.eff.needs_session_scores and upstream.status == 200:
        await a.sessions.learn(state, parsed.features, a.match.model, None, a.now, verdict.scores)
    record.scores = {**record.scores, **kept}
    return response, upstream_time


def _header_length(values: list[str]) -> int | None:
    """The v2 binary extension's JSON length; refused unless it is said once, in plain ASCII digits (the guard
    and the model server could otherwise read different lengths, e.g. the first and the last of two)."""
    if not values:
        return None
    if len(values) > 1:
        raise ProtocolError("Inference-Header-Content-Length is given more than once")
    value = values[0].strip()
    if not (_DIGITS.fullmatch(value) and len(value) <= 12):
        raise ProtocolError("Inference-Header-Content-Length must be a decimal number of bytes")
    return int(value)


def _declared_scorer(ctx: ScoringContext) -> Mapping[str, float]:
    return {"input.schema": declared_schema_score(ctx.features, ctx.policy.input)}


def _text_scorer(ctx: ScoringContext) -> Mapping[str, float]:
    return text_check_scores(ctx.extra["request"].app[STATE].profile, ctx.extra["parsed"], ctx.model)


def _wire_hardening(decision: Decision) -> WireHardening | None:
    """What an enforced ``harden`` decision asks of the answer; None when the answer stays as it is."""
    h = decision.hardening
    if decision.action != "harden" or not decision.enforced or h is None:
        return None
    wire = WireHardening(round_digits=h.round_digits, top_k=h.top_k, label_only=h.label_only)
    return wire if wire.active else None
