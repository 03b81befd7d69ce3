"""OpenAI-compatible routes: forwarded, relayed, accounted."""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web

from guard_agent.llm import Usage, account, carried, harden_llm_chunk, harden_llm_request, relay_sse, usage_of
from guard_agent.protocols import read_response
from guard_agent.proxy.admit import Admitted
from guard_agent.proxy.decide import Verdict, wire_hardening
from guard_agent.proxy.outcome import Outcome, error_response
from guard_agent.proxy.wire import call_upstream, client_headers, upstream_failure
from guard_agent.state import GuardState

__all__ = ["llm_forward"]


async def llm_forward(request: web.BaseRequest, state: GuardState, a: Admitted, verdict: Verdict, out: Outcome,
                      request_id: str) -> tuple[web.StreamResponse, float]:
    """OpenAI-compatible routes: a hardened request loses its logit_bias; streamed answers are relayed chunk by
    chunk; the usage goes into the event; the trackers learn the prompt (the answer has no class to learn)."""
    parsed, record = a.parsed, a.sessions.record
    hardening = wire_hardening(verdict.decision)
    body = a.body
    if hardening is not None:
        body = harden_llm_request(body, hardening)
        out.fields["hardening"] = "applied"
    t0 = time.perf_counter()
    try:
        upstream = await call_upstream(state, request, body, request_id, readable=True)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return upstream_failure(state, out, exc, request_id), time.perf_counter() - t0
    async with upstream:
        headers = client_headers(upstream.headers, request_id)
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
        await a.sessions.learn(parsed.features, a.match.model, None, a.now, verdict.scores)
    record.scores = {**record.scores, **kept}
    return response, upstream_time
