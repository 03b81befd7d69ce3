"""Scoring and the decision on an admitted request, recorded in its event and its session records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from guard_agent.policy.decide import decide
from guard_agent.policy.model import Decision
from guard_agent.protocols import Hardening as WireHardening
from guard_agent.protocols import ParsedRequest
from guard_agent.proxy.admit import Admitted
from guard_agent.proxy.outcome import Outcome
from guard_agent.scoring import ScoringContext, declared_schema_score, run_scorers, saturate_detector_scores
from guard_agent.state import GuardState
from guard_agent.text_scoring import TextModels, text_check_scores

__all__ = ["Verdict", "score_and_decide", "wire_hardening"]


@dataclass(slots=True)
class Verdict:
    """The decision on an admitted request and the scores it was made on."""

    decision: Decision
    scores: dict[str, float]


async def score_and_decide(request: web.BaseRequest, state: GuardState, a: Admitted, out: Outcome) -> Verdict:
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
    state.metrics.scores.observe_all(scores)
    return verdict


async def _decide(request: web.BaseRequest, state: GuardState, a: Admitted, out: Outcome) -> Verdict:
    """A blocked or throttled session is refused before any scoring (refusals must stay cheap under abuse);
    every other request is scored, then decided."""
    facts = a.session_facts
    if a.eff.mode == "enforce" and (facts.blocked_rule is not None or facts.rate_limited):
        early = decide(a.request_facts, {}, facts, a.eff)
        if early.refused:
            return Verdict(early, {})
    scores, failure = await _scores(request, state, a, out)
    return Verdict(decide(a.request_facts, scores, facts, a.eff, scoring_failure=failure), scores)


async def _scores(request: web.BaseRequest, state: GuardState, a: Admitted,
                  out: Outcome) -> tuple[dict[str, float], Literal["error", "budget"] | None]:
    """Every score the policy may read: the stateless scorers (detectors within the budget), the model's
    integrity and, when a rule reads them, the session trackers' (the worse of the request's two sessions)."""
    model = a.match.model
    ctx = ScoringContext(features=a.features, row_shape=a.parsed.row_shape, model=model,
                         protocol=a.parsed.protocol, body=a.body, policy=a.eff,
                         extra={"request": request, "parsed": a.parsed})
    sync_scorers = (_declared_scorer, _TextChecks(state.profile, a.parsed)) if a.parsed.texts else _NUMERIC_SCORERS
    scores, failure = await run_scorers(ctx, sync_scorers, state.async_scorers if a.eff.squeeze.enabled else (),
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
        scores.update(await a.sessions.peek(a.features, model, a.now))
    return scores, failure


def _declared_scorer(ctx: ScoringContext) -> Mapping[str, float]:
    return {"input.schema": declared_schema_score(ctx.features, ctx.policy.input)}


_NUMERIC_SCORERS = (_declared_scorer,)
"""A numeric request's synchronous scorers: the ``text.*`` checks give nothing without texts."""


@dataclass(frozen=True, slots=True)
class _TextChecks:
    """The ``text.*`` scores of one text request, as a scorer (nothing for numeric requests)."""

    profiles: TextModels
    parsed: ParsedRequest

    def __call__(self, ctx: ScoringContext) -> Mapping[str, float]:
        return text_check_scores(self.profiles, self.parsed, ctx.model)


def wire_hardening(decision: Decision) -> WireHardening | None:
    """What an enforced ``harden`` decision asks of the answer; None when the answer stays as it is."""
    h = decision.hardening
    if decision.action != "harden" or not decision.enforced or h is None:
        return None
    wire = WireHardening(round_digits=h.round_digits, top_k=h.top_k, label_only=h.label_only)
    return wire if wire.active else None
