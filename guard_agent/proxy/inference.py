"""One scored request, top-down: admit → score and decide → answer; its session records are written once."""

from __future__ import annotations

from aiohttp import web

from guard_agent.proxy.admit import admit
from guard_agent.proxy.answer import answer
from guard_agent.proxy.decide import score_and_decide
from guard_agent.proxy.outcome import Outcome
from guard_agent.routes import RouteMatch
from guard_agent.state import GuardState

__all__ = ["inference"]


async def inference(request: web.BaseRequest, state: GuardState, match: RouteMatch, out: Outcome,
                    request_id: str) -> tuple[web.StreamResponse, float]:
    """One scored request, top-down: admit → score and decide → answer (refuse, or forward, learn, harden);
    the session records are written once, at the end, whatever the answer."""
    admitted = await admit(request, state, match, out, request_id)
    if isinstance(admitted, web.Response):
        return admitted, 0.0  # refused before any session was read: nothing to write
    verdict = await score_and_decide(request, state, admitted, out)
    response, upstream_time = await answer(request, state, admitted, verdict, out, request_id)
    await admitted.sessions.save(admitted.now)
    return response, upstream_time
