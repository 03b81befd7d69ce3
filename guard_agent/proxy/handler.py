"""The one handler of the guard port: routes the request, runs its path, writes its one decision event."""

from __future__ import annotations

import re
import time
from itertools import chain

import aiohttp
from aiohttp import web

from guard_agent.events import build_decision_event, random_id
from guard_agent.policy.model import Policy
from guard_agent.proxy.inference import inference
from guard_agent.proxy.outcome import Outcome, reject
from guard_agent.proxy.passthrough import passthrough
from guard_agent.proxy.wire import BadBody, ClientGone, SlowClient
from guard_agent.state import GuardState

__all__ = ["handle", "raw_target_path", "refuse_early"]


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-Id")
    return given if given is not None and _REQUEST_ID.match(given) else random_id()


def refuse_early(state: GuardState, request: web.BaseRequest, status: int, code: str, message: str) -> web.Response:
    """A request refused before routing (headers too large, a head aiohttp's parser refused, a handler that
    failed): the JSON error with a validated request id (never the client's unchecked value), one decision
    event and the request counters, like every other request. ``message`` is the guard's, never client bytes."""
    started = time.perf_counter()
    request_id = _request_id(request)
    out = Outcome()
    out.rule = code
    out.source_ip = request.remote
    response = reject(state, out, status, code, message, request_id)
    response.force_close()
    out.status = status
    _emit(state, request, state.policies.current, out, request_id, started)
    state.metrics.requests.inc("refused", out.action, str(status))
    return response


def _header_bytes(request: web.BaseRequest) -> int:
    """The head's size as sent: each field's name and value, ": " and CRLF."""
    raw = request.raw_headers
    return sum(map(len, chain.from_iterable(raw))) + 4 * len(raw)


async def handle(state: GuardState, request: web.BaseRequest) -> web.StreamResponse:
    """The guard port's one request handler (aiohttp's low-level server calls it with the state bound, see
    ``server.GuardRunner``): no router, no ``web.Request``, since the route table below reads the raw path."""
    if request.headers.get("Expect"):
        await _expect(request)
    limit = state.settings.max_header_bytes
    if _header_bytes(request) > limit:
        return refuse_early(state, request, 431, "headers_too_large", f"request headers exceed {limit} bytes")
    started = time.perf_counter()
    request_id = _request_id(request)
    match = state.routes.match(request.method, request.raw_path)
    out = Outcome()
    out.model = match.model
    state.in_flight += 1
    upstream_time = 0.0
    try:
        if request.version not in _HTTP1:
            response: web.StreamResponse = _unsupported_version(state, out, request, request_id)
        elif match.kind == "invalid":
            response = reject(state, out, 400, "invalid_path", match.reason, request_id)
        elif match.kind == "denied":
            out.rule = "route-not-allowed"
            response = reject(state, out, 403, "route_not_allowed", "route not allowed", request_id)
        elif match.kind == "passthrough":
            out.rule = "passthrough"
            response, upstream_time = await passthrough(request, state, match, out, request_id)
        else:
            response, upstream_time = await inference(request, state, match, out, request_id)
    except BadBody as exc:
        out.rule = "invalid-input"
        response = reject(state, out, 400, "invalid_input", str(exc), request_id)
    except SlowClient:
        response = reject(state, out, 408, "request_timeout", "the request body was not received in time",
                          request_id, {"Connection": "close"})
    except ClientGone:  # 499 as nginx logs it: the event says what happened; the answer reaches no one
        response = reject(state, out, 499, "client_closed", "the client closed the connection mid-body",
                          request_id, {"Connection": "close"})
    finally:
        state.in_flight -= 1
    out.status = response.status
    policy = state.policies.current
    _emit(state, request, policy, out, request_id, started)
    metrics = state.metrics
    metrics.requests.inc(match.route, out.action, str(out.status))
    metrics.overhead.observe(match.route, max(0.0, time.perf_counter() - started - upstream_time))
    return response


_HTTP1 = frozenset({aiohttp.HttpVersion10, aiohttp.HttpVersion11})


async def _expect(request: web.BaseRequest) -> None:
    """``Expect`` as aiohttp's router answered it: ``100 Continue`` to ``100-continue`` over HTTP/1.1 (the body is
    then read whole before anything is forwarded), 417 to any other expectation; nothing over HTTP/1.0."""
    if request.version != aiohttp.HttpVersion11:
        return
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response's size
    await request.writer.drain()


def _unsupported_version(state: GuardState, out: Outcome, request: web.BaseRequest, request_id: str) -> web.Response:
    """400 for a request line naming another HTTP version (``HTTP/2.0`` over a plain HTTP/1 connection): a client
    error like any malformed request line (DESIGN.md's statuses), not a fault of the guard's.

    aiohttp would answer in the request's own version (``HTTP/2.0 200`` in HTTP/1 framing), so the answer is
    written here as HTTP/1.1 and the connection closed; the response returned is for the event (aiohttp's own
    write of it meets the closed transport and is dropped)."""
    response = reject(state, out, 400, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served",
                      request_id)
    transport = request.transport
    if transport is not None and not transport.is_closing():
        body = response.body if isinstance(response.body, bytes) else b""
        transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nX-Request-Id: " + request_id.encode() +
                        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()
    return response


def _emit(state: GuardState, request: web.BaseRequest, policy: Policy, out: Outcome, request_id: str,
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
