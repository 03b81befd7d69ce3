"""Read-only routes (health, metadata): checked for access, then streamed through unscored."""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web

from guard_agent.proxy.access import access_refusal
from guard_agent.proxy.outcome import Outcome, reject
from guard_agent.proxy.wire import call_upstream, client_headers, read_body, upstream_failure
from guard_agent.routes import RouteMatch
from guard_agent.state import GuardState

__all__ = ["passthrough"]


async def passthrough(request: web.BaseRequest, state: GuardState, match: RouteMatch, out: Outcome,
                      request_id: str) -> tuple[web.StreamResponse, float]:
    identity = state.identity.resolve(request.headers, request.remote)
    out.session, out.source_ip = identity.session, identity.address
    # unscored is not unauthenticated: model metadata needs the same credentials as inference; plain health stays
    # open for probes unless the policy's access.health_requires_credentials says otherwise
    refusal = access_refusal(state, out, identity, state.policies.current.for_model(out.model), request_id,
                             model_required=False, health=match.health)
    if refusal is not None:
        return refusal, 0.0
    if request.method not in ("GET", "HEAD") and (request.content_length or request.can_read_body):
        body = await read_body(request, state.settings.max_body_bytes, state.settings.client_read_timeout)
        if body is None:
            return reject(state, out, 413, "body_too_large", "request body too large", request_id), 0.0
    else:
        body = None
    t0 = time.perf_counter()
    try:
        upstream = await call_upstream(state, request, body, request_id)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return upstream_failure(state, out, exc, request_id), time.perf_counter() - t0
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=client_headers(upstream.headers, request_id))
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
    state.metrics.upstream_latency.observe("passthrough", time.perf_counter() - t0)
    return response, time.perf_counter() - t0
