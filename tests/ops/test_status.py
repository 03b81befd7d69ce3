"""`guard-agent status` against a running guard that has served benign clients and a real attack."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from guard_agent.attacks import GuardClient
from guard_agent.commands.status import format_status
from tests._support.servers import free_port
from tests.ops._cli import cli, cli_json
from tests.ops.conftest import BENIGN_KEYS, Ops

pytestmark = pytest.mark.slow


def attacker_session(ops: Ops) -> str:
    recent = ops.guard.state.recent
    assert recent is not None
    return next(e.session for e in recent.log if e.request_id.startswith("jbda-") and e.session)


def admin_args(ops: Ops) -> tuple[str, ...]:
    return ("--admin", ops.guard.admin, "--token-file", str(ops.guard.token_file))


class TestStatus:
    def test_text_names_revisions_the_blocking_rule_and_the_attacker_first(self, ops: Ops) -> None:
        """The text says ready, shows both revisions, the blocks by rule, the attacker first by risk, sink and
        Redis health."""
        code, out, err = cli("status", *admin_args(ops))
        assert code == 0, err
        state = ops.guard.state
        lines = out.splitlines()
        assert lines[0].startswith("guard      READY")
        assert f"policy     {state.policies.current.revision[:12]}  mode enforce" in out
        assert state.profile.revision is not None and f"profile    {state.profile.revision[:12]}" in out
        block_rules = {r.id for r in state.policies.current.default.rules if r.action == "block"}
        blocks = re.findall(r"^\s+\d+\s+block\s+rule (\S+)$", out, re.MULTILINE)
        assert blocks and set(blocks) <= block_rules, out
        top = lines.index(next(line for line in lines if line.startswith("top sessions by risk")))
        assert lines[top + 2].strip().startswith(attacker_session(ops)[:16])
        assert re.search(r"^sink siem\s+up: delivered [1-9]", out, re.MULTILINE), out
        # up; a call over Redis's time budget on a loaded machine is a counted fallback, so any count is fine here
        assert re.search(r"^redis\s+up; fallbacks: ", out, re.MULTILINE), out

    def test_json_counts_every_request_once(self, ops: Ops) -> None:
        """--json: the decision count equals the requests sent (one event per request), blocks included."""
        doc: dict[str, Any] = cli_json("status", *admin_args(ops), "--minutes", "60")
        status, decisions = doc["status"], doc["decisions"]
        assert status["ready"] is True and status["reasons"] == {}
        assert decisions["total"] == ops.benign_sent + ops.attack_sent
        assert decisions["by_action"]["block"] >= 1
        assert decisions["top_sessions"][0]["session"] == attacker_session(ops)
        assert status["sinks"]["siem"]["delivered"] > 0 and status["sinks"]["siem"]["up"] == 1
        assert status["redis"]["configured"] is True and status["redis"]["up"] is True
        assert status["policy"]["revision"] == ops.guard.state.policies.current.revision

    def test_wrong_token_exits_2_and_says_why(self, ops: Ops, tmp_path: Path) -> None:
        """A wrong token: exit 2, the HTTP status and the hint, no traceback."""
        bad = tmp_path / "token"
        bad.write_text("not-the-token\n")
        code, out, err = cli("status", "--admin", ops.guard.admin, "--token-file", str(bad))
        assert code == 2 and out == ""
        assert "HTTP 401" in err and "the token is wrong" in err

    def test_unreachable_guard_exits_2(self, ops: Ops) -> None:
        """Nothing listening: exit 2 with 'cannot connect'."""
        code, _, err = cli("status", "--admin", f"http://127.0.0.1:{free_port()}", "--token-file",
                           str(ops.guard.token_file), "--timeout", "2")
        assert code == 2 and "cannot connect" in err

    def test_guard_port_instead_of_admin_port_is_explained(self, ops: Ops) -> None:
        """Pointing at the guard port (not the admin port) gets a clear error, not a crash."""
        code, _, err = cli("status", "--admin", ops.guard.url, "--token-file", str(ops.guard.token_file))
        assert code == 2 and "HTTP 403" in err


class TestRedisDown:
    def test_redis_outage_shows_as_fallback(self, ops: Ops) -> None:
        """With the guard's Redis stopped (a real outage) and a request served from local state, status says Redis
        is down and counts the fallbacks; the guard stays ready (it never fails a request for Redis). Runs last:
        the session's Redis stays down."""
        ops.redis.stop()
        client = GuardClient(ops.guard.url, keys=[BENIGN_KEYS[0]], run_id="during-outage")
        client.predict(ops.guard.model.X_test[:2])
        client.close()
        assert client.answered == 2
        code, out, err = cli("status", *admin_args(ops))
        assert code == 0, err
        assert re.search(r"^redis      DOWN: local fallback in use; fallbacks: (down|error|timeout) [1-9]", out,
                         re.MULTILINE), out
        doc: dict[str, Any] = cli_json("status", *admin_args(ops))
        assert doc["status"]["redis"]["up"] is False
        assert sum(doc["status"]["redis"]["fallbacks"].values()) >= 1


class TestFormat:
    def test_not_ready_lists_each_reason(self) -> None:
        """A guard that is not ready: the first line says so and each failing check is listed with its reason."""
        status = {"ready": False, "version": "0", "uptime_seconds": 5, "in_flight": 0,
                  "reasons": {"upstream": "the model server does not accept connections"},
                  "policy": {"revision": "abc", "mode": "monitor", "source": "p.yaml", "reloads": {"failed": 2}},
                  "profile": {"revision": None, "configured": False, "reloads": {}},
                  "sessions": {"local": 0}, "redis": {"configured": False}, "sinks": {}}
        decisions = {"minutes": 5, "total": 0, "by_action": {}, "by_action_rule": [], "top_sessions": []}
        text = format_status(status, decisions)
        assert text.splitlines()[0].startswith("guard      NOT READY")
        assert "  not ready: upstream: the model server does not accept connections" in text
        assert "rejected 2" in text and "none (built-in checks only)" in text
