"""What one request did, collected for its single decision event, and the JSON error answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from guard_agent.state import GuardState

__all__ = ["BLOCK_MESSAGE", "Outcome", "error_response", "reject"]


BLOCK_MESSAGE = "request refused by policy"


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """The JSON error body of DESIGN.md, with the request id echoed."""
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    hdrs = {"X-Request-Id": request_id, **(headers or {})}
    return web.Response(status=status, body=body, content_type="application/json", headers=hdrs)


class Outcome:
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


def reject(state: GuardState, out: Outcome, status: int, code: str, message: str,
           request_id: str, headers: Mapping[str, str] | None = None) -> web.Response:
    out.action, out.outcome = "reject", "failure"
    if out.rule == "default":
        out.rule = code
    state.metrics.rejects.labels(code).inc()
    return error_response(status, code, message, request_id, headers)
