"""Recent decisions, for operators: per-minute counts, top sessions by risk, and a short log of decisions.

An observer of the event logger (``EventLogger(observer=...)``): it sees every decision event that is
written, after allow sampling (alerts are never sampled, so block/throttle/flag/harden counts are exact;
allow counts are exact at the default ``log_sample_allow: 1``). The admin API (``/admin/decisions``) and
``guard-agent status`` / ``explain`` read it; the request path only appends to bounded structures.

It also exports ``inference_guard_decisions_total{action,rule,model}``: the guard's request counter has
no rule label, and "which rule is blocking" is the first question in an incident. ``model`` is bounded:
a name gets its own label only once the model server answered a request for it (status < 400), at most
``max_models`` names; anything else is ``other`` (a client cannot mint series with made-up model names).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from guard_agent.metrics import LabelledCounter

__all__ = ["DecisionEntry", "RecentDecisions", "SessionSummary", "risk_of"]

_RISKY = 0.5  # a session this risky is tracked even in a minute already holding max_sessions sessions
_RISK_SCORES = ("session.risk", "session.prada", "session.fingerprint", "session.global_fingerprint",
                "session.crawl", "session.neighbors", "session.coverage", "session.margin")
_RISK_SET = frozenset(_RISK_SCORES)


def risk_of(scores: Mapping[str, float]) -> float:
    """One number per decision for ranking sessions: ``session.risk`` when the trackers give it, else the
    highest session score (0 when the guard has no session trackers)."""
    risk = scores.get("session.risk")
    if risk is not None:
        return float(risk)
    if _RISK_SET.isdisjoint(scores):  # a guard without session trackers: one pass over the few scores it has
        return 0.0
    return max((float(scores[n]) for n in _RISK_SCORES if n in scores), default=0.0)


class DecisionEntry(NamedTuple):
    """One decision as the short log keeps it (scores as logged: rounded, never inputs). A NamedTuple: built
    once per request, and a frozen dataclass costs several times as much to construct."""

    t: float
    request_id: str
    session: str | None
    model: str | None
    action: str
    rule: str
    status: int
    enforced: bool
    scores: Mapping[str, float]
    matched: tuple[str, ...]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DecisionEntry:
        """Back from ``as_dict`` (what ``/admin/decisions/log`` answers)."""
        return cls(t=float(doc["t"]), request_id=str(doc["request_id"]), session=doc.get("session"),
                   model=doc.get("model"), action=str(doc["action"]), rule=str(doc["rule"]), status=int(doc["status"]),
                   enforced=bool(doc["enforced"]), scores=doc["scores"], matched=tuple(doc["matched_rules"]))

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "request_id": self.request_id, "session": self.session, "model": self.model,
                "action": self.action, "rule": self.rule, "status": self.status, "enforced": self.enforced,
                "scores": dict(self.scores), "matched_rules": list(self.matched)}


@dataclass(slots=True)
class SessionSummary:
    """What one session did within one minute."""

    requests: int = 0
    max_risk: float = 0.0
    last_seen: float = 0.0
    last_action: str = "allow"
    last_rule: str = "default"
    actions: dict[str, int] = field(default_factory=dict)

    def add(self, entry_t: float, action: str, rule: str, risk: float) -> None:
        self.requests += 1
        self.max_risk = max(self.max_risk, risk)
        self.last_seen = entry_t
        self.last_action, self.last_rule = action, rule
        self.actions[action] = self.actions.get(action, 0) + 1


@dataclass(slots=True)
class _Minute:
    start: int
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    sessions: dict[str, SessionSummary] = field(default_factory=dict)


class RecentDecisions:
    """Bounded memory: ``minutes`` per-minute buckets (at most ``max_sessions`` sessions each, twice that for
    risky ones) and the last ``log_size`` decisions."""

    def __init__(self, registry: CollectorRegistry, *, minutes: int = 60, log_size: int = 2048,
                 max_sessions: int = 2000, max_models: int = 32,
                 clock: Callable[[], float] = time.time) -> None:
        self._minutes: deque[_Minute] = deque(maxlen=minutes)
        self.log: deque[DecisionEntry] = deque(maxlen=log_size)
        self._max_sessions = max_sessions
        self._max_models = max_models
        self._models: set[str] = set()
        self._clock = clock
        self.started = clock()
        self._decisions = LabelledCounter(
            "inference_guard_decisions_total",
            "Decision events written, by action, winning rule and model (allow after sampling)",
            ("action", "rule", "model"), registry)

    def __call__(self, fields: Mapping[str, Any]) -> None:
        """Observe one decision event (the fields ``build_decision_event`` made: read by key, not probed)."""
        event, guard, http = fields["ecs_event"], fields["guard"], fields["http"]
        action, rule = event["action"], fields["rule"]["name"]
        status = http["response"]["status_code"]
        model, session, scores = guard["model"], guard["session"], guard["scores"]
        self._decisions.inc(action, rule, self._model_label(model, status))
        now = self._clock()
        self.log.append(DecisionEntry(now, http["request"]["id"], session, model, action, rule, status,
                                      guard["enforced"], scores, tuple(guard.get("matched_rules", ()))))
        minute = self._minute(now)
        key = (action, rule)
        minute.counts[key] = minute.counts.get(key, 0) + 1
        if session:
            self._add_session(minute, session, now, action, rule, risk_of(scores))

    def _add_session(self, minute: _Minute, session: str, now: float, action: str, rule: str, risk: float) -> None:
        summary = minute.sessions.get(session)
        if summary is None:
            held = len(minute.sessions)
            # full: only risky sessions still get a place (up to twice the bound), so flooding a minute with
            # fresh harmless sessions cannot push an attacker out of the top list
            if held >= self._max_sessions and (risk < _RISKY or held >= 2 * self._max_sessions):
                return
            summary = minute.sessions[session] = SessionSummary()
        summary.add(now, action, rule, risk)

    def _model_label(self, model: object, status: int) -> str:
        if not isinstance(model, str) or not model:
            return ""
        if model in self._models:
            return model
        if 0 < status < 400 and len(self._models) < self._max_models:
            self._models.add(model)
            return model
        return "other"

    def _minute(self, now: float) -> _Minute:
        start = int(now // 60) * 60
        minutes = self._minutes
        if not minutes or minutes[-1].start != start:
            minutes.append(_Minute(start))
        return minutes[-1]

    def summary(self, minutes: int, top: int = 10) -> dict[str, Any]:
        """Counts by action and rule over the last ``minutes`` minute buckets, and the ``top`` sessions by risk
        (then by refused requests, then by requests)."""
        now = self._clock()
        since = int(now // 60) * 60 - 60 * (max(1, minutes) - 1)
        by_action: dict[str, int] = {}
        by_rule: dict[str, int] = {}
        pairs: dict[tuple[str, str], int] = {}
        sessions: dict[str, SessionSummary] = {}
        for minute in self._minutes:
            if minute.start < since:
                continue
            for (action, rule), n in minute.counts.items():
                by_action[action] = by_action.get(action, 0) + n
                by_rule[rule] = by_rule.get(rule, 0) + n
                pairs[(action, rule)] = pairs.get((action, rule), 0) + n
            for sid, s in minute.sessions.items():
                acc = sessions.setdefault(sid, SessionSummary())
                acc.requests += s.requests
                acc.max_risk = max(acc.max_risk, s.max_risk)
                if s.last_seen >= acc.last_seen:
                    acc.last_seen, acc.last_action, acc.last_rule = s.last_seen, s.last_action, s.last_rule
                for a, n in s.actions.items():
                    acc.actions[a] = acc.actions.get(a, 0) + n

        def rank(item: tuple[str, SessionSummary]) -> tuple[float, int, int]:
            s = item[1]
            return (s.max_risk, s.actions.get("block", 0) + s.actions.get("throttle", 0), s.requests)

        ranked = sorted(sessions.items(), key=rank, reverse=True)[:max(0, top)]
        return {
            "since": float(max(since, int(self.started))),
            "until": now,
            "total": sum(by_action.values()),
            "by_action": dict(sorted(by_action.items(), key=lambda kv: -kv[1])),
            "by_rule": dict(sorted(by_rule.items(), key=lambda kv: -kv[1])),
            "by_action_rule": [{"action": a, "rule": r, "count": n}
                               for (a, r), n in sorted(pairs.items(), key=lambda kv: -kv[1])],
            "top_sessions": [{"session": sid, "requests": s.requests, "max_risk": round(s.max_risk, 6),
                              "actions": s.actions, "last_action": s.last_action, "last_rule": s.last_rule,
                              "last_seen": s.last_seen} for sid, s in ranked],
        }

    def find(self, *, session: str | None = None, request_id: str | None = None) -> list[DecisionEntry]:
        """Decisions still in the short log for a session, or the session of a request id."""
        entries = list(self.log)
        if request_id and not session:
            session = next((e.session for e in entries if e.request_id == request_id), None)
            if session is None:
                return [e for e in entries if e.request_id == request_id]
        return [e for e in entries if e.session == session]
