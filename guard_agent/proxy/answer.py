"""The answer to an admitted, decided request: the refusal, or the model's answer forwarded, learnt from by
the session trackers and hardened."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
from aiohttp import web
from multidict import CIMultiDictProxy

from guard_agent.llm import OPENAI_PROTOCOLS
from guard_agent.policy.decide import INTEGRITY_RULE
from guard_agent.policy.model import Decision
from guard_agent.protocols import HARDENABLE_PROTOCOLS, harden_document, parse_document, read_response
from guard_agent.proxy.admit import Admitted
from guard_agent.proxy.decide import Verdict, wire_hardening
from guard_agent.proxy.llm import llm_forward
from guard_agent.proxy.outcome import BLOCK_MESSAGE, Outcome, error_response
from guard_agent.proxy.upstream import UpstreamError
from guard_agent.proxy.wire import (
    call_upstream,
    client_headers,
    upstream_deadline,
    upstream_failure,
    upstream_headers,
    upstream_target,
)
from guard_agent.state import GuardState

__all__ = ["answer"]


async def answer(request: web.BaseRequest, state: GuardState, a: Admitted, verdict: Verdict, out: Outcome,
                 request_id: str) -> tuple[web.StreamResponse, float]:
    """The refusal the decision calls for, or the model's answer: forwarded, learnt from, hardened."""
    decision = verdict.decision
    if decision.refused:
        out.outcome = "failure"
        return _refusal(decision, request_id), 0.0
    if a.parsed.protocol in OPENAI_PROTOCOLS:
        return await llm_forward(request, state, a, verdict, out, request_id)
    forwarded = await _forward(request, state, a, out, request_id)
    if isinstance(forwarded, tuple):
        return forwarded
    payload = forwarded.payload
    if 200 <= forwarded.status < 300:
        answered = await _learn_and_harden(state, a, verdict, payload, out)
        if answered is None:  # never leak the full answer because it could not be degraded
            out.outcome = "failure"
            return error_response(502, "hardening_failed", "the model's answer could not be hardened",
                                  request_id), forwarded.seconds
        payload = answered
    return web.Response(status=forwarded.status, reason=forwarded.reason, body=payload,
                        headers=client_headers(forwarded.headers, request_id)), forwarded.seconds


@dataclass(frozen=True, slots=True)
class _Forwarded:
    """The model's whole answer to the request's exact bytes, and how long the model took."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    payload: bytes
    seconds: float


async def _forward(request: web.BaseRequest, state: GuardState, a: Admitted, out: Outcome,
                   request_id: str) -> _Forwarded | tuple[web.Response, float]:
    """The scored bytes to the model, its answer read whole within the deadline; 502/504 when it fails.

    A plain ``http://`` upstream is called through the guard's own pool (``proxy.upstream``: the whole call,
    a free connection, the connect and the whole answer, within one deadline); any other through aiohttp's
    client (the head within the deadline, then the body within another)."""
    t0 = time.perf_counter()
    reason: str | None
    try:
        if state.upstream is not None:
            got = await state.upstream.request(request.method, upstream_target(request, a.strip_query),
                                               upstream_headers(state, request, request_id, readable=True).items(),
                                               a.body, timeout=upstream_deadline(state))
            status, reason, headers, payload = got.status, got.reason, got.headers, got.payload
        else:
            upstream = await call_upstream(state, request, a.body, request_id, readable=True,
                                           strip_query=a.strip_query)
            async with upstream, asyncio.timeout(upstream_deadline(state)):
                payload = await upstream.read()
                status, reason, headers = upstream.status, upstream.reason, upstream.headers
    except (TimeoutError, aiohttp.ClientError, UpstreamError) as exc:
        return upstream_failure(state, out, exc, request_id), time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    state.metrics.upstream_latency.observe(a.match.route, seconds)
    return _Forwarded(status, reason, headers, payload, seconds)


def _refusal(decision: Decision, request_id: str) -> web.Response:
    """503 while the model fails its integrity check, 429 (with ``Retry-After``) to a throttle, else 403."""
    if decision.rule == INTEGRITY_RULE:
        return error_response(503, "integrity_violation",
                              "the model failed its integrity check; requests are refused until it passes",
                              request_id)
    if decision.action == "throttle":
        retry = str(max(1, int(np.ceil(decision.retry_after or 1.0))))
        return error_response(429, "throttled", "too many requests", request_id, {"Retry-After": retry})
    return error_response(403, "blocked", BLOCK_MESSAGE, request_id)


async def _learn_and_harden(state: GuardState, a: Admitted, verdict: Verdict, payload: bytes,
                            out: Outcome) -> bytes | None:
    """The trackers learn the model's answer; the answer as the client gets it (hardened when the decision
    says so), None when it could not be hardened.

    The answer is decoded once, for the trackers and the hardening alike, and only when its shape is known:
    ``parse_document`` and ``harden_document`` read exactly the hardenable protocols (a custom route's is
    opaque)."""
    protocol = a.parsed.protocol
    hardening = wire_hardening(verdict.decision)
    readable = protocol in HARDENABLE_PROTOCOLS
    learn = a.eff.needs_session_scores
    doc = read_response(payload) if readable and (learn or hardening is not None) else None
    if learn:
        answered = parse_document(protocol, doc, a.parsed.rows)  # None without doc
        await a.sessions.learn(a.features, a.match.model, answered, a.now, verdict.scores)
    if hardening is None:
        return payload
    hardened = harden_document(protocol, doc, hardening)
    out.fields["hardening"] = "failed" if hardened is None else "applied"
    return hardened
