"""`guard-agent explain` on a real captured extraction attack and a benign session, from the capture files
and from the running guard's admin API."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest

from tests.ops._cli import cli, cli_json
from tests.ops.conftest import ROUNDS, Ops
from tests.ops.test_status import admin_args, attacker_session

pytestmark = pytest.mark.slow


def capture_args(ops: Ops) -> tuple[str, ...]:
    return ("--capture", str(ops.guard.capture_dir))


class TestFromCapture:
    def test_attack_by_request_id_is_blocked_with_the_policy_cooldown(self, ops: Ops) -> None:
        """A request id of the attack stands for its session: every decision is there, the session is blocked by
        a block rule since the first refused request, until that rule's cool-down ends."""
        story: dict[str, Any] = cli_json("explain", "jbda-7", *capture_args(ops))
        assert story["session"] == attacker_session(ops)
        assert story["requests"] == ops.attack_sent
        blocked = story["blocked"]
        assert blocked is not None and blocked["active"] is True and blocked["source"] == "captured decisions"
        policy = ops.guard.state.policies.current.default
        rule = next(r for r in policy.rules if r.id == blocked["rule"])
        assert rule.action == "block"
        cooldown = policy.block_cooldown if rule.cooldown is None else rule.cooldown
        assert blocked["until"] - blocked["since"] == pytest.approx(cooldown)
        first_refusal = next(s for s in story["timeline"] if s["status"] == 403)
        assert blocked["since"] == first_refusal["t"] and blocked["request_id"] == first_refusal["request_id"]
        assert blocked["refused"] == sum(1 for s in story["timeline"] if s["status"] == 403)
        fired = {r["rule"]: r for r in story["rules"]}
        assert fired[blocked["rule"]]["first"] <= blocked["since"]
        assert story["unblock"] and attacker_session(ops) in story["unblock"][1]

    def test_benign_session_is_not_blocked(self, ops: Ops) -> None:
        """A benign client's session: every request allowed, no block, nothing to unblock."""
        story: dict[str, Any] = cli_json("explain", "benign1-3", *capture_args(ops))
        assert story["requests"] == ROUNDS * 5
        assert story["actions"] == {"allow": ROUNDS * 5}
        assert story["blocked"] is None and story["blocks"] == [] and story["unblock"] == []

    def test_text_story_says_why_and_until_when(self, ops: Ops) -> None:
        """The plain text: the block, the rule's description from the captured policy, the scores at the block,
        the timeline and the unblock commands."""
        code, out, err = cli("explain", attacker_session(ops), *capture_args(ops), "--steps", "6")
        assert code == 0, err
        story: dict[str, Any] = cli_json("explain", attacker_session(ops), *capture_args(ops))
        rule = story["blocked"]["rule"]
        description = next(r.description for r in ops.guard.state.policies.current.default.rules if r.id == rule)
        assert f"BLOCKED by rule {rule} since " in out and " until " in out
        assert f"  why: {description}" in out
        assert "  scores at the block: session.risk=" in out
        assert f"... {ops.attack_sent - 6} more ..." in out
        assert f"/admin/sessions/{attacker_session(ops)}/unblock" in out

    def test_unknown_id_exits_1(self, ops: Ops) -> None:
        """An id that is neither a session nor a request id: exit 1, saying so."""
        code, out, err = cli("explain", "no-such-request", *capture_args(ops))
        assert code == 1 and out == "" and "no session or request 'no-such-request'" in err

    def test_no_source_exits_2(self) -> None:
        """Neither --capture nor --admin: exit 2 with what to give."""
        code, _, err = cli("explain", "x")
        assert code == 2 and "--capture" in err


class TestFromRunningGuard:
    def test_live_record_gives_the_block_and_the_policy_gives_the_reason(self, ops: Ops) -> None:
        """With --admin only: the guard's own record says blocked until when; the decisions it holds match the
        capture's."""
        sid = attacker_session(ops)
        live: dict[str, Any] = cli_json("explain", sid, *admin_args(ops))
        captured: dict[str, Any] = cli_json("explain", sid, *capture_args(ops))
        assert live["blocked"]["source"] == "live session record" and live["blocked"]["active"] is True
        assert live["blocked"]["rule"] == captured["blocked"]["rule"]
        assert live["blocked"]["until"] == pytest.approx(captured["blocked"]["until"], abs=0.05)
        assert [s["request_id"] for s in live["timeline"]] == [s["request_id"] for s in captured["timeline"]]
        assert live["requests_recorded_by_guard"] == ops.attack_sent
        code, out, _ = cli("explain", sid, *admin_args(ops))
        assert code == 0 and "  why: " in out

    def test_after_unblock_the_story_says_it_was_lifted(self, ops: Ops) -> None:
        """After POST /admin/sessions/<id>/unblock the live record wins: blocked before, no longer now."""
        sid = attacker_session(ops)
        req = urllib.request.Request(f"{ops.guard.admin}/admin/sessions/{sid}/unblock", method="POST",
                                     headers={"Authorization": f"Bearer {ops.guard.state.settings.admin_token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        story: dict[str, Any] = cli_json("explain", sid, *admin_args(ops), *capture_args(ops))
        assert story["blocked"]["active"] is False and story["unblock"] == []
        code, out, _ = cli("explain", sid, *admin_args(ops))
        assert code == 0 and "was blocked (no longer) by rule" in out
