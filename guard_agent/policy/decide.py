"""``decide()``: the pure decision function (no I/O, no clock).

Checks run in a fixed chain, as in an Envoy filter chain: the allow list
short-circuits to allow; the deny list, an active block cool-down, a failed
model integrity check under ``integrity.on_violation: block`` and a fail-closed
scoring failure short-circuit to block. Otherwise every rule is
evaluated, the rate limit adds a throttle candidate, and the most severe
action wins (block > throttle > harden > flag > allow). ``rule`` names the
winning rule, ``default`` when none matched. A ``harden`` on a protocol whose
answers cannot be degraded (custom routes) becomes a block of that request
only, here rather than in the proxy, so replays see what the guard did.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from guard_agent.policy.model import SEVERITY, Action, Decision, EffectivePolicy
from guard_agent.protocols import HARDENABLE_PROTOCOLS

__all__ = ["INTEGRITY_RULE", "UNHARDENABLE_REASON", "RequestFacts", "SessionFacts", "decide", "facts_for"]

INTEGRITY_RULE = "model-integrity"
"""Rule name of decisions taken because the model failed its integrity check (canaries, signatures)."""

UNHARDENABLE_REASON = "the answer on this route cannot be hardened"
"""Reason of a ``harden`` turned into a block because the route's answers have no known shape."""


@dataclass(frozen=True)
class RequestFacts:
    """What the guard knows about the request itself."""

    model: str | None
    protocol: str
    rows: int
    body_bytes: int
    features: int
    source_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)  # request.* facts from the body (OpenAI routes)


@dataclass(frozen=True)
class SessionFacts:
    """What the guard knows about the session, as of before this request."""

    id: str
    source: str = "address"
    queries: int = 0
    age_seconds: float = 0.0
    blocked_rule: str | None = None
    rate_limited: bool = False
    retry_after: float = 0.0
    usage: Mapping[str, Any] = field(default_factory=dict)  # session.tokens etc. (OpenAI routes, guard_agent/llm)


_LLM_DEFAULTS: Mapping[str, Any] = {"request.stream": False, "request.logprobs": 0, "request.top_logprobs": 0,
                                    "request.logit_bias": 0, "request.logit_bias_max": 0.0, "request.max_tokens": 0}


_SESSION_LLM_DEFAULTS: Mapping[str, Any] = {"session.tokens": 0.0, "session.logit_bias_tokens": 0.0,
                                            "session.logprob_requests": 0.0}


def facts_for(request: RequestFacts, scores: Mapping[str, float], session: SessionFacts) -> dict[str, Any]:
    """The flat namespace rules are evaluated against."""
    facts: dict[str, Any] = dict(scores)
    facts["request.rows"] = request.rows
    facts["request.body_bytes"] = request.body_bytes
    facts["request.model"] = request.model
    facts["request.protocol"] = request.protocol
    facts["request.features"] = request.features
    facts.update(_LLM_DEFAULTS)
    facts.update(request.properties)
    facts["session.queries"] = session.queries
    facts["session.age_seconds"] = session.age_seconds
    facts["session.source"] = session.source
    facts.update(_SESSION_LLM_DEFAULTS)
    facts.update(session.usage)
    return facts


_PLAIN_ALLOW: Mapping[bool, Decision] = {enforced: Decision("allow", "default", enforced=enforced)
                                          for enforced in (True, False)}
"""The decision when no rule matched and nothing failed (most requests), by ``enforced``: one frozen object each,
equal to the one ``decide()`` would build, instead of a new one per request."""


def _in_networks(ip: Any, networks: tuple[Any, ...]) -> bool:
    return bool(networks) and ip is not None and any(ip.version == n.version and ip in n for n in networks)


def decide(
    request: RequestFacts,
    scores: Mapping[str, float],
    session: SessionFacts,
    policy: EffectivePolicy,
    *,
    scoring_failure: Literal["error", "budget"] | None = None,
) -> Decision:
    """Map one request's facts to a decision under ``policy``."""
    enforced = policy.mode == "enforce"
    lists = policy.lists
    if session.id in lists.allow_sessions or _in_networks(request.source_ip, lists.allow_networks):
        return Decision("allow", "allow-list", enforced=enforced, reason="session or address on the allow list")
    if session.id in lists.deny_sessions or _in_networks(request.source_ip, lists.deny_networks):
        return Decision("block", "deny-list", enforced=enforced, reason="session or address on the deny list")
    if session.blocked_rule is not None:
        return Decision("block", session.blocked_rule, enforced=enforced,
                        reason="session is blocked (cool-down after an earlier block)")
    integrity_failed = scores.get("integrity.canary", 0.0) >= 1.0
    if integrity_failed and policy.integrity_action == "block":
        return Decision("block", INTEGRITY_RULE, technique="AML.T0018", enforced=enforced,
                        reason="the model behind the guard failed its integrity check")
    if scoring_failure is not None:
        closed = (policy.failure.on_error if scoring_failure == "error" else policy.failure.on_budget) == "closed"
        if closed:
            return Decision("block", f"scoring-{scoring_failure}", enforced=enforced,
                            reason=f"scoring failed ({scoring_failure}) and the policy fails closed")

    facts = facts_for(request, scores, session)
    best_action: Action = "allow"
    best_rule = "default"
    technique: str | None = None
    cooldown: float | None = None
    matched: list[str] = []
    for rule in policy.rules:
        if rule.matches(facts):
            matched.append(rule.id)
            if SEVERITY[rule.action] > SEVERITY[best_action]:
                best_action, best_rule, technique, cooldown = rule.action, rule.id, rule.technique, rule.cooldown
    if integrity_failed and policy.integrity_action == "flag" and SEVERITY["flag"] > SEVERITY[best_action]:
        best_action, best_rule, technique = "flag", INTEGRITY_RULE, "AML.T0018"
        matched.append(INTEGRITY_RULE)
    if session.rate_limited and SEVERITY["throttle"] > SEVERITY[best_action]:
        best_action, best_rule, technique = "throttle", "rate-limit", None
        matched.append("rate-limit")
    if best_action == "allow" and scoring_failure is not None:
        best_rule = f"scoring-{scoring_failure}"
    if best_action == "allow" and not matched and scoring_failure is None:
        return _PLAIN_ALLOW[enforced]
    if best_action == "harden" and request.protocol not in HARDENABLE_PROTOCOLS:
        # refuse this request rather than leak the full answer or spend a model call on it; no cool-down, the
        # rule asked for less than a block. Monitor mode reports the same, as enforcing would do it.
        return Decision("block", best_rule, matched=tuple(matched), technique=technique, enforced=enforced,
                        reason=UNHARDENABLE_REASON, cooldown=0.0, unhardenable=True)
    return Decision(
        action=best_action,
        rule=best_rule,
        matched=tuple(matched),
        technique=technique,
        enforced=enforced,
        hardening=policy.hardening if best_action == "harden" else None,
        retry_after=max(1.0, session.retry_after) if best_action == "throttle" else None,
        cooldown=cooldown if best_action == "block" else None,
    )
