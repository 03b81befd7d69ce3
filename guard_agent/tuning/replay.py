"""Re-deciding captured traffic under another policy with the guard's own pure ``decide()``.

Exact for everything ``decide()`` reads from the request and its scores: the
rules, lists (session hashes and ``source.ip``), integrity handling, mode and
fail-open/closed for recorded scoring failures. Three inputs depend on earlier
decisions and are handled as follows:

- **block cool-downs** are simulated per session under the replayed policy,
  from the capture's request times. A session seen in cool-down at the start of
  the capture (its first block predates the capture) keeps its captured
  decision, marked inexact.
- **rate limits**: when the replayed policy's limit for the model equals the
  captured one and the captured decision tells whether the bucket was empty
  (``rate-limit`` in the matched rules, or a decision milder than throttle), that
  is used as is; otherwise the token bucket is simulated from request times
  (marked inexact when the simulation throttles). Per-key limits from the API
  key file are not in the capture.
- **session scores** (``session.*``) are the trackers' view under the captured
  history. Once the replayed policy forwards a request the guard refused, or
  refuses one it forwarded, the trackers would have seen a different history;
  later decisions of that session that depend on a ``session.*`` rule are marked
  inexact.

Detector scores can be recomputed under a new profile when features were
captured encrypted (``rescore``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from guard_agent.policy.decide import RequestFacts, SessionFacts, decide, facts_for
from guard_agent.policy.loader import parse_policy
from guard_agent.policy.model import SEVERITY, Condition, Decision, EffectivePolicy, Policy
from guard_agent.ratelimit import Bucket, cooldown_start, rate_check
from guard_agent.tuning.records import Capture, CapturedDecision, PolicySnapshot

__all__ = ["Change", "ReplayResult", "Rescorer", "deciding_rule", "disambiguate", "policy_from_snapshot", "replay"]

Rescorer = Callable[[CapturedDecision], Mapping[str, float] | None]
"""New detector scores for a captured request (None = keep the captured scores)."""

_SPECIAL_RULES = frozenset({"allow-list", "deny-list", "model-integrity", "rate-limit", "scoring-error",
                            "scoring-budget", "default"})


@dataclass(frozen=True)
class Change:
    """One request whose action differs between the captured and the replayed decision."""

    request_id: str
    session: str
    model: str | None
    t: float
    before: str
    after: str
    rule_before: str
    rule_after: str
    exact: bool
    cooldown_before: bool = False   # the captured block came from a cool-down, not from a rule matching
    cooldown_after: bool = False    # the replayed block comes from a cool-down the replay started


@dataclass
class ReplayResult:
    total: int = 0
    changes: list[Change] = field(default_factory=list)
    rule_only: int = 0
    inexact: int = 0
    carried_cooldowns: int = 0
    rescored: int = 0
    unsealed_missing: int = 0
    fidelity_checked: int = 0
    fidelity_mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    after_counts: Counter[str] = field(default_factory=Counter)
    before_counts: Counter[str] = field(default_factory=Counter)

    @property
    def new_blocks(self) -> list[Change]:
        return [c for c in self.changes if c.after == "block"]

    def transitions(self) -> Counter[tuple[str, str]]:
        return Counter((c.before, c.after) for c in self.changes)

    def by_rule(self) -> Counter[str]:
        return Counter(deciding_rule(c) for c in self.changes)

    def by_model(self) -> Counter[str]:
        return Counter(c.model or "-" for c in self.changes)

    def by_session(self) -> Counter[str]:
        return Counter(c.session for c in self.changes)

    def examples(self, key: Callable[[Change], Any], value: Any, limit: int = 3) -> list[str]:
        return [c.request_id for c in self.changes if key(c) == value][:limit]


def deciding_rule(c: Change) -> str:
    """The rule responsible for a change: the new one when it got stricter, the old one when it got milder;
    ``(cool-down)`` when the block is the session's cool-down after that rule blocked an earlier request."""
    if SEVERITY.get(c.after, 0) > SEVERITY.get(c.before, 0):
        return c.rule_after + (" (cool-down)" if c.cooldown_after else "")
    return c.rule_before + (" (cool-down)" if c.cooldown_before else "")


def policy_from_snapshot(snap: PolicySnapshot) -> Policy:
    """Re-compile a captured policy document (same rules; the revision is of the re-rendered text)."""
    text = yaml.safe_dump(dict(snap.document), sort_keys=False)
    available = snap.available_scores or None
    return parse_policy(text, source=f"<captured policy {snap.revision[:12]}>", available_scores=available).policy


@dataclass
class _SessionSim:
    bucket: Bucket | None = None
    blocked_until: float = 0.0
    blocked_rule: str | None = None
    diverged: bool = False
    seen_rule_block: bool = False   # the capture shows this session blocked by a rule (not a cool-down)


def _captured_rate_limited(d: CapturedDecision) -> bool | None:
    """What the captured decision tells about the token bucket (None = a stricter action hid it)."""
    if "rate-limit" in d.matched:
        return True
    if SEVERITY.get(d.action, 0) < SEVERITY["throttle"]:
        return False
    return None


def _looks_like_cooldown(d: CapturedDecision) -> bool:
    return d.action == "block" and not d.matched and d.rule not in _SPECIAL_RULES


_ROUNDING = 5e-7 + 1e-12
_NUDGE = 1e-9


def _short_circuited(d: CapturedDecision) -> bool:
    """True when the captured decision did not evaluate the rules (so ``matched`` says nothing)."""
    return (_looks_like_cooldown(d) or d.rule in ("allow-list", "deny-list")
            or (d.action == "block" and d.rule in ("model-integrity", "scoring-error", "scoring-budget")))


def _near(value: float | None, c: Condition) -> bool:
    """Rounding to 6 decimals may have moved ``value`` across this condition's threshold."""
    return (value is not None and c.op in ("gte", "gt", "lte", "lt") and isinstance(c.value, int | float)
            and abs(value - float(c.value)) <= _ROUNDING)


def _placed(c: Condition, held: bool) -> float:
    """A value on the side of ``c``'s threshold that makes the condition hold (or not)."""
    t = float(c.value)
    if c.op in ("gte", "gt"):
        return (t if c.op == "gte" else t + _NUDGE) if held else (t - _NUDGE if c.op == "gte" else t)
    return (t if c.op == "lte" else t - _NUDGE) if held else (t + _NUDGE if c.op == "lte" else t)


def disambiguate(d: CapturedDecision, captured: EffectivePolicy | None) -> Mapping[str, float]:
    """Scores rounded to 6 decimals, corrected where rounding hides a threshold comparison.

    For a rule of the captured policy with exactly one condition within rounding distance of its threshold
    and every other condition clearly true, the captured ``matched_rules`` tell which side of the threshold
    the score was on; the score is moved there.
    """
    if d.exact_scores or captured is None or _short_circuited(d):
        return d.scores
    scores = dict(d.scores)
    facts: dict[str, Any] | None = None
    for rule in captured.rules:
        near = [c for c in rule.conditions if _near(scores.get(c.fact), c)]
        if len(near) != 1:
            continue
        if len(rule.conditions) > 1:
            if facts is None:
                facts = facts_for(_request_facts(d), scores, _session_facts(d))
            if not all(c.holds(facts) for c in rule.conditions if c is not near[0]):
                continue  # the rule failed on another condition: it says nothing about this one
        scores[near[0].fact] = _placed(near[0], rule.id in d.matched)
    return scores


def _request_facts(d: CapturedDecision) -> RequestFacts:
    return RequestFacts(model=d.model, protocol=d.protocol, rows=d.rows, body_bytes=d.body_bytes,
                        features=d.features, source_ip=d.ip)


def _session_facts(d: CapturedDecision, **state: Any) -> SessionFacts:
    return SessionFacts(id=d.session, source=d.session_source, queries=d.session_queries,
                        age_seconds=d.session_age_seconds, **state)


class _Runner:
    """Replays decisions in time order under one policy, keeping the per-session state the guard keeps."""

    def __init__(self, policy_for: Callable[[CapturedDecision], EffectivePolicy],
                 captured_policy_for: Callable[[CapturedDecision], EffectivePolicy | None]) -> None:
        self.policy_for = policy_for
        self.captured_policy_for = captured_policy_for
        self.sessions: dict[str, _SessionSim] = {}

    def step(self, d: CapturedDecision, scores: Mapping[str, float]) -> tuple[Decision, bool, bool]:
        """(decision, exact, carried cool-down); ``last_cooldown`` tells whether the block came from one."""
        sim = self.sessions.setdefault(d.session, _SessionSim())
        eff = self.policy_for(d)
        exact = True
        rate_limited, retry_after = self._rate(d, eff, sim)
        blocked = sim.blocked_rule if d.t < sim.blocked_until else None
        carried = False
        if blocked is None and _looks_like_cooldown(d) and not sim.seen_rule_block and eff.block_cooldown > 0:
            blocked, carried, exact = d.rule, True, False  # blocked before the capture began
        decision = decide(
            _request_facts(d), scores,
            _session_facts(d, blocked_rule=blocked, rate_limited=rate_limited, retry_after=retry_after),
            eff, scoring_failure=d.scoring_failure,  # type: ignore[arg-type]
        )
        self.last_cooldown = (blocked is not None and decision.action == "block" and not decision.matched
                              and decision.rule == blocked)
        if rate_limited and self._simulated and decision.action == "throttle":
            exact = False
        if sim.diverged and any(r in decision.matched or r in d.matched for r in self._session_rules(eff)):
            exact = False
        if d.action == "block" and not _looks_like_cooldown(d):
            sim.seen_rule_block = True
        started = cooldown_start(decision, eff, d.t, blocked)  # the live path's own rule
        if started is not None:
            sim.blocked_until, sim.blocked_rule = started
        if decision.refused != d.refused:
            sim.diverged = True
        return decision, exact, carried

    _simulated = False
    last_cooldown = False

    def _rate(self, d: CapturedDecision, eff: EffectivePolicy, sim: _SessionSim) -> tuple[bool, float]:
        self._simulated = False
        limit = eff.rate_limit
        sim.bucket, simulated, retry = rate_check(sim.bucket, d.t, limit)  # the live path's own bucket
        captured_eff = self.captured_policy_for(d)
        known = _captured_rate_limited(d)
        if captured_eff is not None and captured_eff.rate_limit == limit and known is not None:
            return known, retry
        if captured_eff is None and known is not None:
            return known, retry  # no policy line (a plain event log): assume the limit did not change
        self._simulated = True
        return simulated, retry

    @staticmethod
    def _session_rules(eff: EffectivePolicy) -> set[str]:
        return {r.id for r in eff.rules if any(c.fact.startswith("session.") for c in r.conditions)}


def replay(capture: Capture, policy: Policy, *, rescore: Rescorer | None = None,
           check_fidelity: bool = True) -> ReplayResult:
    """Re-decide every captured decision under ``policy`` and collect what changed."""
    result = ReplayResult()
    compiled: dict[str, Policy | None] = {}

    def captured_policy(d: CapturedDecision) -> Policy | None:
        if d.policy_revision not in compiled:
            snap = capture.policies.get(d.policy_revision)
            try:
                compiled[d.policy_revision] = policy_from_snapshot(snap) if snap is not None else None
            except ValueError as exc:
                result.notes.append(f"captured policy {d.policy_revision[:12]} does not compile: {exc}")
                compiled[d.policy_revision] = None
        return compiled[d.policy_revision]

    def captured_eff(d: CapturedDecision) -> EffectivePolicy | None:
        p = captured_policy(d)
        return None if p is None else p.for_model(d.model)

    new_runner = _Runner(lambda d: policy.for_model(d.model), captured_eff)
    old_runner = _Runner(lambda d: captured_eff(d) or policy.for_model(d.model), captured_eff)
    missing_policy = 0
    for d in capture.decisions:
        result.total += 1
        result.before_counts[d.action] += 1
        base_scores = disambiguate(d, captured_eff(d))
        if check_fidelity and captured_eff(d) is not None:
            again, _, _ = old_runner.step(d, base_scores)
            result.fidelity_checked += 1
            if again.action != d.action or again.rule != d.rule:
                result.fidelity_mismatches.append(d.request_id)
        elif captured_eff(d) is None:
            missing_policy += 1
        scores = base_scores
        if rescore is not None:
            fresh = rescore(d)
            if fresh is None:
                result.unsealed_missing += 1
            else:
                scores = {**base_scores, **fresh}
                result.rescored += 1
        decision, exact, carried = new_runner.step(d, scores)
        result.after_counts[decision.action] += 1
        result.carried_cooldowns += carried
        if not exact:
            result.inexact += 1
        if decision.action != d.action:
            result.changes.append(Change(d.request_id, d.session, d.model, d.t, d.action, decision.action,
                                         d.rule, decision.rule, exact, cooldown_before=_looks_like_cooldown(d),
                                         cooldown_after=new_runner.last_cooldown))
        elif decision.rule != d.rule:
            result.rule_only += 1
    if missing_policy:
        result.notes.append(f"{missing_policy} decisions have no captured policy line (a plain event log?): "
                            "rate-limit changes cannot be detected for them")
    return result
