"""The read-only admin endpoints behind `status` and `explain`, and the decision history they read."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from guard_agent.events import build_decision_event
from guard_agent.recent import RecentDecisions, risk_of
from tests.ops.conftest import Ops

ENDPOINTS = ("/admin/status", "/admin/decisions", "/admin/decisions/log?session=x")


def get(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


@pytest.mark.slow
class TestEndpoints:
    @pytest.mark.parametrize("path", ENDPOINTS)
    def test_need_the_token(self, ops: Ops, path: str) -> None:
        """Without the bearer token every new endpoint answers 401 and tells nothing."""
        status, body = get(ops.guard.admin + path, None)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, _ = get(ops.guard.admin + path, "wrong")
        assert status == 401

    def test_decisions_log_needs_a_session_or_request_id(self, ops: Ops) -> None:
        """/admin/decisions/log without session= or request_id= is a 400 saying what to give."""
        status, body = get(ops.guard.admin + "/admin/decisions/log", ops.guard.state.settings.admin_token)
        assert status == 400 and "session=" in body["error"]["message"]

    def test_bad_window_is_a_400(self, ops: Ops) -> None:
        """A non-integer minutes= is refused with a clear message; out-of-range values are clamped to 1..60."""
        token = ops.guard.state.settings.admin_token
        status, body = get(ops.guard.admin + "/admin/decisions?minutes=soon", token)
        assert status == 400 and body["error"]["message"] == "minutes must be an integer"
        status, body = get(ops.guard.admin + "/admin/decisions?minutes=9999&top=0", token)
        assert status == 200 and body["minutes"] == 60 and body["top_sessions"] == []

    def test_log_by_request_id_returns_its_session(self, ops: Ops) -> None:
        """A request id finds the whole session's decisions and its stored record."""
        status, body = get(ops.guard.admin + "/admin/decisions/log?request_id=benign2-4",
                           ops.guard.state.settings.admin_token)
        assert status == 200
        assert {d["session"] for d in body["decisions"]} == {body["session"]}
        assert "benign2-4" in {d["request_id"] for d in body["decisions"]}
        assert body["record"]["queries"] == len(body["decisions"])

    def test_readiness_gauges_match_readyz(self, ops: Ops) -> None:
        """/metrics carries inference_guard_ready and one ready_condition per /readyz check."""
        with urllib.request.urlopen(ops.guard.admin + "/readyz", timeout=10) as r:
            checks = orjson.loads(r.read())["checks"]
        with urllib.request.urlopen(ops.guard.admin + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "inference_guard_ready 1.0" in text
        for check in checks:
            assert f'inference_guard_ready_condition{{check="{check}"}} 1.0' in text
        assert f'inference_guard_profile_info{{revision="{ops.guard.state.profile.revision}"}} 1.0' in text

    def test_alerting_counters_exist_at_zero_before_their_first_event(self, ops: Ops) -> None:
        """A rejected reload must be an increase: its series is on /metrics at 0 before any reload."""
        with urllib.request.urlopen(ops.guard.admin + "/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in ('inference_guard_policy_reloads_total{result="failed"} 0.0',
                     'inference_guard_profile_reloads_total{result="failed"} 0.0',
                     'inference_guard_scoring_failures_total{kind="budget"} 0.0'):
            assert line in text


def event(action: str, rule: str, session: str, *, model: str = "digits", status: int = 200,
          risk: float = 0.0, request_id: str = "r") -> dict[str, Any]:
    return build_decision_event(action=action, outcome="success", rule=rule, mode="enforce", enforced=True,
                                session=session, model=model, rows=1, scores={"session.risk": risk},
                                policy_revision="p", profile_revision=None, request_id=request_id, method="POST",
                                status=status, path="/v2/models/digits/infer", source_ip=None, technique=None,
                                started=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class TestRecentDecisions:
    def test_window_counts_only_recent_minutes(self) -> None:
        """Counts cover the asked minutes only; older minute buckets drop out of the window."""
        clock = Clock()
        recent = RecentDecisions(CollectorRegistry(), clock=clock)
        recent(event("block", "session-attack", "a"))
        clock.now += 600
        recent(event("allow", "default", "b"))
        assert recent.summary(5)["by_action"] == {"allow": 1}
        assert recent.summary(60)["by_action"] == {"allow": 1, "block": 1}

    def test_top_sessions_rank_by_risk(self) -> None:
        """Sessions are ranked by their highest risk in the window, then by refusals."""
        recent = RecentDecisions(CollectorRegistry(), clock=Clock())
        for i in range(3):
            recent(event("allow", "default", "low", risk=0.1, request_id=f"l{i}"))
        recent(event("flag", "session-suspicious", "high", risk=0.9))
        top = recent.summary(5, top=2)["top_sessions"]
        assert [s["session"] for s in top] == ["high", "low"]
        assert top[1]["requests"] == 3 and top[0]["last_rule"] == "session-suspicious"

    def test_model_label_is_bounded(self) -> None:
        """A model name becomes a label only once the model answered for it; made-up names count as other."""
        registry = CollectorRegistry()
        recent = RecentDecisions(registry, clock=Clock(), max_models=1)
        recent(event("block", "r", "s", model="made-up", status=403))
        recent(event("allow", "default", "s", model="digits", status=200))
        recent(event("allow", "default", "s", model="iris", status=200))
        value = registry.get_sample_value
        assert value("inference_guard_decisions_total", {"action": "block", "rule": "r", "model": "other"}) == 1
        assert value("inference_guard_decisions_total", {"action": "allow", "rule": "default", "model": "digits"}) == 1
        assert value("inference_guard_decisions_total", {"action": "allow", "rule": "default", "model": "other"}) == 1

    def test_sessions_per_minute_are_capped(self) -> None:
        """Past max_sessions a minute keeps counting decisions but tracks no more harmless sessions; a risky one
        still gets a place (up to twice the bound), so a flood of fresh sessions cannot hide an attacker."""
        recent = RecentDecisions(CollectorRegistry(), clock=Clock(), max_sessions=2)
        for i in range(5):
            recent(event("allow", "default", f"s{i}"))
        recent(event("block", "session-attack", "attacker", risk=0.96))
        for i in range(5):
            recent(event("flag", "session-suspicious", f"risky{i}", risk=0.7))
        summary = recent.summary(1, top=10)
        assert summary["total"] == 11
        assert [s["session"] for s in summary["top_sessions"]] == ["attacker", "risky0", "s0", "s1"]

    def test_risk_falls_back_to_the_highest_session_score(self) -> None:
        """Without session.risk the highest session score ranks; without session scores, 0."""
        assert risk_of({"session.prada": 0.4, "session.neighbors": 0.7, "ood.knn": 0.99}) == 0.7
        assert risk_of({"ood.knn": 0.99}) == 0.0
