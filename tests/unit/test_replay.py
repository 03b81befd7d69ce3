"""Replay: captured decisions re-decided under a policy with the guard's own decide()."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from guard_agent.cli import main
from guard_agent.events import build_decision_event
from guard_agent.policy import parse_policy
from guard_agent.tuning import read_capture, replay

SESSION = "a" * 32

BASE = {
    "version": 1, "mode": "enforce",
    "rate_limit": {"requests_per_second": 50, "burst": 100},
    "block": {"cooldown_seconds": 60},
    "rules": [
        {"id": "ood-flag", "when": {"ood.combined": {"gte": 0.99}}, "action": "flag"},
        {"id": "ood-block", "when": {"ood.combined": {"gte": 0.9999}}, "action": "block"},
        {"id": "schema", "when": {"input.schema": {"gte": 1.0}}, "action": "block"},
    ],
}


def variant(changes: dict[str, Any]) -> dict[str, Any]:
    """BASE with values replaced at slash-separated paths (score names contain dots)."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        node = doc
        *parents, last = path.split("/")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return doc


def policy_text(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


class Recorder:
    """Writes a capture file the way the guard does: policy line, then decision events plus capture data."""

    def __init__(self, path: Path, doc: dict[str, Any] | None = BASE) -> None:
        self.path = path
        self.doc = doc
        self.revision = parse_policy(policy_text(doc)).policy.revision if doc is not None else "unknown"
        self.lines: list[bytes] = []
        if doc is not None:
            self.lines.append(orjson.dumps({"capture": {
                "v": 1, "kind": "policy", "revision": self.revision, "document": doc,
                "available_scores": ["input.schema", "ood.combined", "ood.knn", "session.risk"]}}))

    def add(self, rid: str, t: float, scores: dict[str, float], action: str, rule: str = "default",
            matched: tuple[str, ...] = (), session: str = SESSION, exact: bool = False, rows: int = 1) -> None:
        refused = action in ("block", "throttle")
        extra: dict[str, Any] = {"protocol": "v2", "body_bytes": 200, "features": 64, "session_source": "header",
                                 "session_queries": 0, "session_age_seconds": 0.0}
        if matched:
            extra["matched_rules"] = list(matched)
        f = build_decision_event(
            action=action, outcome="failure" if refused else "success", rule=rule, mode="enforce", enforced=True,
            session=session, model="digits", rows=rows, scores=scores, policy_revision=self.revision,
            profile_revision="p", request_id=rid, method="POST", status=403 if refused else 200,
            path="/v2/models/digits/infer", source_ip="10.1.2.3", technique=None, started=time.perf_counter(),
            extra_guard=extra)
        f["event"] = f.pop("ecs_event")
        if exact:
            f["guard"]["scores"] = scores
        f["capture"] = {"v": 1, "kind": "decision", "t": t, "exact_scores": exact}
        self.lines.append(orjson.dumps(f))

    def write(self) -> Path:
        self.path.write_bytes(b"\n".join(self.lines) + b"\n")
        return self.path


def simple_capture(tmp_path: Path) -> Path:
    r = Recorder(tmp_path / "cap.jsonl")
    r.add("ok-1", 1000.0, {"ood.combined": 0.5, "input.schema": 0.0}, "allow", session="b" * 32)
    r.add("ok-2", 1001.0, {"ood.combined": 0.98, "input.schema": 0.0}, "allow", session="c" * 32)
    r.add("flag-1", 1002.0, {"ood.combined": 0.995, "input.schema": 0.0}, "flag", "ood-flag", ("ood-flag",),
          session="d" * 32)
    r.add("block-1", 1003.0, {"ood.combined": 0.99995, "input.schema": 0.0}, "block", "ood-block",
          ("ood-flag", "ood-block"), session="e" * 32)
    return r.write()


class TestReplay:
    def test_same_policy_reproduces_every_decision(self, tmp_path: Path) -> None:
        """Replaying the captured policy changes nothing and the fidelity check passes for all."""
        cap = read_capture([simple_capture(tmp_path)])
        result = replay(cap, parse_policy(policy_text(BASE)).policy)
        assert result.total == 4 and result.changes == [] and result.rule_only == 0
        assert result.fidelity_checked == 4 and result.fidelity_mismatches == []

    def test_lower_threshold_lists_changes_with_request_ids(self, tmp_path: Path) -> None:
        """A lower flag threshold turns exactly the requests between the thresholds into flags."""
        cap = read_capture([simple_capture(tmp_path)])
        result = replay(cap, parse_policy(policy_text(variant({"rules/0/when/ood.combined/gte": 0.9}))).policy)
        assert [(c.request_id, c.before, c.after, c.rule_after) for c in result.changes] == [
            ("ok-2", "allow", "flag", "ood-flag")]
        assert result.transitions() == {("allow", "flag"): 1}
        assert result.by_rule() == {"ood-flag": 1}
        assert result.new_blocks == []

    def test_milder_policy_attributes_change_to_old_rule(self, tmp_path: Path) -> None:
        """When a block becomes a flag, the change is attributed to the rule that used to block."""
        cap = read_capture([simple_capture(tmp_path)])
        result = replay(cap, parse_policy(policy_text(variant({"rules/1/action": "flag"}))).policy)
        assert [(c.before, c.after) for c in result.changes] == [("block", "flag")]
        assert result.by_rule() == {"ood-block": 1}

    def test_cooldown_is_simulated_under_the_new_policy(self, tmp_path: Path) -> None:
        """Requests blocked only by the cool-down are allowed once the new policy no longer blocks the first."""
        r = Recorder(tmp_path / "cap.jsonl")
        r.add("first", 100.0, {"ood.combined": 0.99999}, "block", "ood-block", ("ood-flag", "ood-block"))
        r.add("during", 130.0, {"ood.combined": 0.1}, "block", "ood-block")
        r.add("after", 200.0, {"ood.combined": 0.1}, "allow")
        cap = read_capture([r.write()])
        same = replay(cap, parse_policy(policy_text(BASE)).policy)
        assert same.changes == [] and same.fidelity_mismatches == []
        milder = replay(cap, parse_policy(policy_text(variant({"rules/1/action": "flag"}))).policy)
        assert [(c.request_id, c.after) for c in milder.changes] == [("first", "flag"), ("during", "allow")]
        shorter = replay(cap, parse_policy(policy_text(variant({"block/cooldown_seconds": 10}))).policy)
        assert [(c.request_id, c.after) for c in shorter.changes] == [("during", "allow")]

    def test_a_rules_own_cooldown_is_simulated(self, tmp_path: Path) -> None:
        """A rule with ``cooldown_seconds: 0`` blocks only its request: the next one of the session is re-decided
        on its own scores, not blocked by the policy-wide cool-down."""
        r = Recorder(tmp_path / "cap.jsonl")
        r.add("first", 100.0, {"ood.combined": 0.99999}, "block", "ood-block", ("ood-flag", "ood-block"))
        r.add("next", 101.0, {"ood.combined": 0.1}, "block", "ood-block")
        cap = read_capture([r.write()])
        per_request = replay(cap, parse_policy(policy_text(variant({"rules/1/cooldown_seconds": 0}))).policy)
        assert [(c.request_id, c.after) for c in per_request.changes] == [("next", "allow")]

    def test_cooldown_from_before_the_capture_is_carried(self, tmp_path: Path) -> None:
        """A session already in cool-down when the capture began keeps its block, counted as inexact."""
        r = Recorder(tmp_path / "cap.jsonl")
        r.add("blocked-already", 100.0, {"ood.combined": 0.1}, "block", "ood-block")
        r.add("still-blocked", 110.0, {"ood.combined": 0.1}, "block", "ood-block")
        r.add("released", 200.0, {"ood.combined": 0.1}, "allow")
        r.add("blocked-by-rule", 210.0, {"ood.combined": 0.99999}, "block", "ood-block", ("ood-flag", "ood-block"))
        r.add("cool-down", 220.0, {"ood.combined": 0.1}, "block", "ood-block")
        result = replay(read_capture([r.write()]), parse_policy(policy_text(BASE)).policy)
        assert result.changes == [] and result.carried_cooldowns == 2 and result.inexact == 2
        assert result.fidelity_mismatches == []

    def test_rounded_scores_at_a_threshold_follow_the_captured_match(self, tmp_path: Path) -> None:
        """A 0.9999996 score logged as 1.0 did not match `gte: 1.0`; replay must not pretend it did."""
        r = Recorder(tmp_path / "cap.jsonl")
        r.add("near", 1.0, {"input.schema": 0.9999996, "ood.combined": 0.1}, "allow", session="f" * 32)
        r.add("at", 2.0, {"input.schema": 1.0, "ood.combined": 0.1}, "block", "schema", ("schema",),
              session="g" * 32)
        cap = read_capture([r.write()])
        assert cap.decisions[0].scores["input.schema"] == 1.0  # rounded in the event
        result = replay(cap, parse_policy(policy_text(BASE)).policy)
        assert result.changes == [] and result.fidelity_mismatches == []

    def test_tighter_rate_limit_is_simulated(self, tmp_path: Path) -> None:
        """A lower rate limit throttles a burst the old limit let through; marked as simulated (inexact)."""
        r = Recorder(tmp_path / "cap.jsonl")
        for i in range(20):
            r.add(f"burst-{i}", 10.0 + i * 0.05, {"ood.combined": 0.1}, "allow")
        cap = read_capture([r.write()])
        assert replay(cap, parse_policy(policy_text(BASE)).policy).changes == []
        tight = replay(cap, parse_policy(policy_text(
            variant({"rate_limit": {"requests_per_second": 1, "burst": 5}}))).policy)
        assert len(tight.changes) == 15  # 5 from the burst; 0.75 tokens refill before the last request
        assert {(c.before, c.after) for c in tight.changes} == {("allow", "throttle")}
        assert all(not c.exact for c in tight.changes)

    def test_event_log_without_policy_lines(self, tmp_path: Path) -> None:
        """Plain decision-event logs replay too; the missing policy line is reported."""
        r = Recorder(tmp_path / "log.jsonl", doc=None)
        r.add("x", 1.0, {"ood.combined": 0.995}, "flag", "ood-flag", ("ood-flag",))
        result = replay(read_capture([r.write()]), parse_policy(policy_text(BASE)).policy)
        assert result.changes == [] and result.fidelity_checked == 0
        assert any("no captured policy line" in n for n in result.notes)


class TestReplayCommand:
    def test_fail_on_new_blocks_exit_code(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--fail-on-new-blocks exits 1 when a stricter policy newly blocks a captured request, else 0."""
        cap = simple_capture(tmp_path)
        strict = tmp_path / "strict.yaml"
        strict.write_text(policy_text(variant({"rules/1/when/ood.combined/gte": 0.99})))
        assert main(["replay", "--capture", str(cap), "--policy", str(strict)]) == 0
        assert main(["replay", "--capture", str(cap), "--policy", str(strict), "--fail-on-new-blocks"]) == 1
        out = capsys.readouterr()
        assert "flag -> block" in out.out and "flag-1" in out.out and "FAIL: 1 captured request" in out.err
        same = tmp_path / "same.yaml"
        same.write_text(policy_text(BASE))
        assert main(["replay", "--capture", str(cap), "--policy", str(same), "--fail-on-new-blocks"]) == 0
        assert "captured policy re-decided: 4/4 identical" in capsys.readouterr().out

    def test_labelled_attack_sessions_do_not_fail_ci(self, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
        """With --labels, new blocks inside labelled attack sessions are reported but do not fail the run."""
        cap = simple_capture(tmp_path)
        strict = tmp_path / "strict.yaml"
        strict.write_text(policy_text(variant({"rules/1/when/ood.combined/gte": 0.99})))
        labels = tmp_path / "attacks.txt"
        labels.write_text("d" * 32 + "  # the session of flag-1\n")
        assert main(["replay", "--capture", str(cap), "--policy", str(strict), "--fail-on-new-blocks",
                     "--labels", str(labels)]) == 0
        assert "newly blocked outside the 1 labelled attack session(s): 0" in capsys.readouterr().out
        labels.write_text("# nothing labelled\n" + "b" * 32 + "\n")
        assert main(["replay", "--capture", str(cap), "--policy", str(strict), "--fail-on-new-blocks",
                     "--labels", str(labels)]) == 1

    def test_json_lists_every_change(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints one JSON document with the policy, the counts and each changed decision, nothing else."""
        cap = simple_capture(tmp_path)
        strict = tmp_path / "strict.yaml"
        strict.write_text(policy_text(variant({"rules/1/when/ood.combined/gte": 0.99})))
        assert main(["replay", "--capture", str(cap), "--policy", str(strict), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["total"] == 4 and doc["new_blocks_outside_labels"] == ["flag-1"]
        assert [(c["request_id"], c["before"], c["after"]) for c in doc["changes"]] == [("flag-1", "flag", "block")]
        assert doc["policy"]["source"] == str(strict)

    def test_bad_inputs_exit_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A policy that does not validate, or a capture with no decisions, exits 2 with a message."""
        cap = simple_capture(tmp_path)
        bad = tmp_path / "bad.yaml"
        bad.write_text("version: 1\nrules:\n  - id: x\n    when: {ood.combined: {gte: 0.5}}\n    action: explode\n")
        assert main(["replay", "--capture", str(cap), "--policy", str(bad)]) == 2
        assert "bad.yaml:5" in capsys.readouterr().err
        empty = tmp_path / "empty.jsonl"
        empty.write_text("not json\n")
        assert main(["replay", "--capture", str(empty), "--policy", str(bad)]) == 2
        assert "no inference decisions" in capsys.readouterr().err
