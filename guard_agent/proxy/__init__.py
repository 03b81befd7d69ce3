"""The request path, one module per step, in the order a request meets them.

One handler serves every path (aiohttp's low-level server, no router: ``server.GuardRunner``): the guard's own
route table decides what is an inference route, a read-only passthrough or refused, on the raw (undecoded) path,
so aiohttp never normalises a path we would rather refuse. The upstream receives exactly the bytes that were scored.

Reading order: ``handler`` (route, run the path, one decision event) → ``inference`` (the scored path,
top-down) → ``admit`` (identity, access, body, parse, session records, rate limit) → ``decide`` (scores and
the decision) → ``answer`` (refuse, or forward, learn, harden; ``llm`` for OpenAI-compatible routes).
Beside them: ``passthrough`` (unscored read-only routes), ``access``, ``sessions`` (the request's session
records), ``wire`` (headers, bodies, the upstream call) and ``outcome`` (what the event reports, the JSON
error answer).
"""

from guard_agent.proxy.handler import handle, raw_target_path, refuse_early
from guard_agent.proxy.outcome import error_response
from guard_agent.proxy.wire import HOP_BY_HOP

__all__ = ["HOP_BY_HOP", "error_response", "handle", "raw_target_path", "refuse_early"]
