"""Admission: identity and access, the body, parsing and the input schema, the session records with their
cool-down and rate limit. What passes is an ``Admitted`` request."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
from aiohttp import web

from guard_agent.identity import Identity
from guard_agent.llm import OPENAI_PROTOCOLS, llm_session_facts
from guard_agent.policy.decide import RequestFacts, SessionFacts
from guard_agent.policy.model import EffectivePolicy
from guard_agent.protocols import ParsedRequest, ProtocolError, parse_request
from guard_agent.proxy.access import access_refusal
from guard_agent.proxy.outcome import Outcome, reject
from guard_agent.proxy.sessions import RequestSessions
from guard_agent.proxy.wire import read_body
from guard_agent.routes import RouteMatch
from guard_agent.scoring import InputSchemaError, check_input, representable, within_float32
from guard_agent.state import GuardState
from guard_agent.text_scoring import project_texts

__all__ = ["Admitted", "admit"]


_DIGITS = re.compile(r"[0-9]+")


@dataclass(slots=True)
class Admitted:
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
    sessions: RequestSessions
    request_facts: RequestFacts
    session_facts: SessionFacts


async def admit(request: web.BaseRequest, state: GuardState, match: RouteMatch, out: Outcome,
                request_id: str) -> Admitted | web.Response:
    """Identity and access, the query rule, the body, parsing and the input schema, then the session records
    with their cool-down and rate limit; a refusal is the 4xx."""
    now = time.time()
    identity = state.identity.resolve(request.headers, request.remote)
    out.session, out.source_ip = identity.session, identity.address
    eff = state.policies.current.for_model(match.model)
    out.enforced = eff.mode == "enforce"
    refusal = access_refusal(state, out, identity, eff, request_id, model_required=True)
    if refusal is not None:
        return refusal
    has_query = "?" in request.raw_path
    if has_query and eff.input.query == "refuse":
        out.rule = "query-not-allowed"
        return reject(state, out, 400, "invalid_input", "a query string is not accepted on this route "
                      "(policy input.query)", request_id)
    read = await _read_input(request, state, match, eff, out, request_id)
    if isinstance(read, web.Response):
        return read
    body, parsed, in_range = read
    features, beyond_range = representable(parsed.features, in_range=in_range)
    sessions, session_facts = await _admit_session(state, identity, eff, parsed, now, out)
    request_facts = RequestFacts(model=match.model, protocol=parsed.protocol, rows=parsed.rows,
                                 body_bytes=len(body), features=int(parsed.features.shape[1]),
                                 source_ip=identity.ip, properties=parsed.properties)
    return Admitted(now=now, match=match, eff=eff, identity=identity, body=body, parsed=parsed, features=features,
                    beyond_range=beyond_range, strip_query=has_query and eff.input.query == "strip",
                    sessions=sessions, request_facts=request_facts, session_facts=session_facts)


async def _read_input(request: web.BaseRequest, state: GuardState, match: RouteMatch, eff: EffectivePolicy,
                      out: Outcome, request_id: str) -> tuple[bytes, ParsedRequest, bool] | web.Response:
    """The body and the request parsed from it (texts projected by the profile), checked against the input
    schema, and whether its values are all within float32's range (``within_float32``: both checks use it);
    413 or 400 otherwise."""
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes, settings.client_read_timeout)
    if body is None:
        return reject(state, out, 413, "body_too_large", f"request body exceeds {settings.max_body_bytes} bytes",
                      request_id)
    try:
        parsed = _parse(request, state, match, body)
        out.rows = parsed.rows
        parsed = project_texts(state.profile, parsed, match.model)
        in_range = within_float32(parsed.features)
        check_input(parsed.features, eff.input, expected_features=state.profile.expected_features(match.model),
                    in_float32_range=in_range)
    except (ProtocolError, InputSchemaError) as exc:
        out.rule = "invalid-input"
        return reject(state, out, 400, "invalid_input", str(exc), request_id)
    return body, parsed, in_range


async def _admit_session(state: GuardState, identity: Identity, eff: EffectivePolicy, parsed: ParsedRequest,
                         now: float, out: Outcome) -> tuple[RequestSessions, SessionFacts]:
    """The request's session records, read once, with one token taken from each bucket
    (``ratelimit.rate_check``, as the replay) and the cool-down that may run: what ``decide()`` knows of the
    session."""
    sessions = await RequestSessions.load(state.sessions, state.trackers, identity, now)
    if len(sessions.entries) > 1:  # the address's session counts too: name it, so an operator can reset it
        out.fields["address_session"] = sessions.entries[1][0]
    record = sessions.record
    rate_limited, retry_after = sessions.take(now, identity.rate_limit or eff.rate_limit)
    facts = SessionFacts(id=identity.session, source=identity.source, queries=sessions.queries,
                         age_seconds=now - record.first_seen, blocked_rule=sessions.blocked(now),
                         rate_limited=rate_limited, retry_after=retry_after,
                         usage=llm_session_facts(record.scores) if parsed.protocol in OPENAI_PROTOCOLS else {})
    return sessions, facts


def _parse(request: web.BaseRequest, state: GuardState, match: RouteMatch, body: bytes) -> ParsedRequest:
    return parse_request(
        match.protocol or "v2", body, content_type=request.headers.get("Content-Type"),
        content_encoding=request.headers.get("Content-Encoding"), pointer=match.pointer,
        limits=state.parse_limits,
        inference_header_length=_header_length(request.headers.getall("Inference-Header-Content-Length", [])),
    )


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
