"""Policy loading, validation errors with file/line/field, and the pure decide() table."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from guard_agent.policy import (
    BUILTIN_SCORES,
    SCORE_NAMES,
    Policy,
    PolicyError,
    PolicyStore,
    RequestFacts,
    SessionFacts,
    decide,
    default_policy_text,
    load_policy_file,
    parse_policy,
)
from guard_agent.policy.model import Decision

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
version: 1
mode: enforce
rate_limit: {requests_per_second: 10, burst: 20}
hardening: {round_digits: 2, top_k: 3}
lists:
  allow_sessions: [trusted]
  deny_sessions: [banned]
  deny_cidrs: [203.0.113.0/24]
failure: {on_error: closed, on_budget: open, budget_ms: 20}
block: {cooldown_seconds: 60}
rules:
  - id: ood-flag
    when: {ood.combined: {gte: 0.99}}
    action: flag
  - id: ood-block
    when: {ood.combined: {gte: 0.9999}}
    action: block
  - id: risk-harden
    when: {session.risk: {gte: 0.8}}
    action: harden
  - id: big-batch
    when: {request.rows: {gt: 100}, request.model: {in: [digits]}}
    action: flag
models:
  lenient:
    mode: monitor
    disable_rules: [ood-block]
  strict:
    rules:
      - id: strict-any-ood
        when: {ood.combined: {gte: 0.9}}
        action: block
"""


def policy(text: str = BASE, available: frozenset[str] = SCORE_NAMES):  # type: ignore[no-untyped-def]
    return parse_policy(text, source="test.yaml", available_scores=available).policy


def req(model: str | None = "digits", rows: int = 1, ip: str | None = "10.0.0.1",
        protocol: str = "v2") -> RequestFacts:
    return RequestFacts(model=model, protocol=protocol, rows=rows, body_bytes=100, features=64,
                        source_ip=ipaddress.ip_address(ip) if ip else None)


def sess(sid: str = "s1", **kw) -> SessionFacts:  # type: ignore[no-untyped-def]
    return SessionFacts(id=sid, **kw)


class TestShippedPolicy:
    def test_default_policy_is_identical_to_example(self) -> None:
        """The packaged default policy and examples/policy.yaml are the same file."""
        assert (ROOT / "examples" / "policy.yaml").read_text() == default_policy_text()

    def test_default_policy_loads_with_all_scores(self) -> None:
        """With every score available, no rule of the default policy is skipped."""
        loaded = parse_policy(default_policy_text())
        assert loaded.warnings == ()
        assert len(loaded.policy.default.rules) >= 8

    def test_default_policy_loads_without_profile(self) -> None:
        """Without a profile, score rules are skipped with a warning, built-in ones stay."""
        loaded = parse_policy(default_policy_text(), available_scores=BUILTIN_SCORES)
        ids = [r.id for r in loaded.policy.default.rules]
        assert ids == ["input-out-of-range", "text-invisible-characters", "text-control-characters",
                       "text-confusable-characters", "llm-logit-bias-with-logprobs", "llm-logit-bias-sweep"]
        assert any("ood.combined" in w for w in loaded.warnings)
        assert "ood-extreme" in loaded.policy.skipped_rules

    def test_every_example_policy_is_valid(self) -> None:
        """Every policy under examples/ passes validation."""
        files = sorted((ROOT / "examples").glob("**/policy*.yaml"))
        assert files
        for f in files:
            load_policy_file(f)


class TestValidation:
    @pytest.mark.parametrize(("text", "line", "field", "fragment"), [
        ("version: 2\n", 1, "version", "unsupported policy version"),
        ("version: 1\nmode: enforce\nmode: monitor\n", 3, "mode", "duplicate key"),
        ("version: 1\nmode: block\n", 2, "mode", "expected one of enforce, monitor"),
        ("version: 1\nrules:\n  - id: a\n    action: blok\n    when: {ood.knn: {gte: 1}}\n", 4,
         "rules[0].action", "expected one of"),
        ("version: 1\nrules:\n  - id: a\n    action: block\n    when: {ood.knnn: {gte: 1}}\n", 5,
         "rules[0].when.ood.knnn", "unknown score or property"),
        ("version: 1\nrules:\n  - id: a\n    action: block\n    when: {ood.knn: {greater: 1}}\n", 5,
         "rules[0].when.ood.knn.greater", "unknown operator"),
        ("version: 1\nrate_limit:\n  requests_per_second: fast\n", 3, "rate_limit.requests_per_second",
         "expected a number"),
        ("version: 1\nhardening:\n  top_k: 0\n", 3, "hardening.top_k", "must be >= 1"),
        ("version: 1\nlists:\n  deny_cidrs: [not-a-cidr]\n", 3, "lists.deny_cidrs[0]", "does not appear"),
        ("version: 1\nunknown_section: 1\n", 2, "unknown_section", "unknown field"),
        ("version: 1\nrules:\n  - id: a\n    action: flag\n    when: {ood.knn: {gte: 1}}\n"
         "  - id: a\n    action: flag\n    when: {ood.knn: {gte: 1}}\n", 6, "rules[1].id", "duplicate rule id"),
        ("version: 1\nrules: [\n", 3, "", "invalid YAML"),
        ("", 1, "", "empty"),
    ])
    def test_errors_name_file_line_and_field(self, text: str, line: int, field: str, fragment: str) -> None:
        """A bad policy raises PolicyError naming the file, the line and the field."""
        with pytest.raises(PolicyError) as info:
            parse_policy(text, source="bad.yaml")
        err = info.value
        assert err.source == "bad.yaml"
        assert err.line == line
        assert err.field == field
        assert fragment in str(err)
        assert str(err).startswith(f"bad.yaml:{line}")

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A missing file is a PolicyError, not an OSError."""
        with pytest.raises(PolicyError, match="cannot read"):
            load_policy_file(tmp_path / "nope.yaml")

    def test_directory_holds_policy_yaml(self, tmp_path: Path) -> None:
        """A directory path loads its policy.yaml (a mounted ConfigMap)."""
        (tmp_path / "policy.yaml").write_text(BASE)
        assert load_policy_file(tmp_path).policy.default.mode == "enforce"

    def test_revision_is_content_hash(self) -> None:
        """The revision changes with the content and only with it."""
        assert policy().revision == policy().revision
        assert policy().revision != policy(BASE.replace("burst: 20", "burst: 21")).revision


class TestDecide:
    def test_no_rule_matches(self) -> None:
        """Nothing matched: allow, rule 'default'."""
        d = decide(req(), {"ood.combined": 0.5}, sess(), policy().default)
        assert (d.action, d.rule, d.enforced) == ("allow", "default", True)

    def test_plain_allow_is_the_decision_built_in_full(self) -> None:
        """The shared plain-allow decision equals the one built field by field, enforced and in monitor mode."""
        enforced = decide(req(), {"ood.combined": 0.5}, sess(), policy().default)
        monitored = decide(req(), {"ood.combined": 0.5}, sess(), policy().models["lenient"])
        assert enforced == Decision("allow", "default", matched=(), technique=None, enforced=True, hardening=None,
                                    retry_after=None, reason="", cooldown=None, unhardenable=False)
        assert monitored == Decision("allow", "default", enforced=False)
        assert not enforced.refused and not monitored.refused

    def test_most_severe_action_wins(self) -> None:
        """Every rule is evaluated; block beats flag; rule.name is the winner."""
        d = decide(req(), {"ood.combined": 0.99999}, sess(), policy().default)
        assert d.action == "block"
        assert d.rule == "ood-block"
        assert set(d.matched) == {"ood-flag", "ood-block"}
        assert d.technique == "AML.T0015"
        assert d.refused

    def test_flag_only(self) -> None:
        """A flag rule alone lets the request through and does not refuse it."""
        d = decide(req(), {"ood.combined": 0.995}, sess(), policy().default)
        assert (d.action, d.rule, d.refused) == ("flag", "ood-flag", False)

    def test_harden_carries_settings(self) -> None:
        """A harden decision carries the policy's hardening settings."""
        d = decide(req(), {"session.risk": 0.85}, sess(), policy().default)
        assert d.action == "harden"
        assert d.hardening is not None and d.hardening.top_k == 3
        assert d.technique == "AML.T0024.002"

    def test_harden_where_answers_cannot_be_hardened_blocks_without_cooldown(self) -> None:
        """On a route whose answers cannot be degraded (custom), harden becomes a block of this request only:
        no cool-down, a reason that says why, the harden rule still named; monitor mode reports the same."""
        d = decide(req(protocol="custom"), {"session.risk": 0.85}, sess(), policy().default)
        assert (d.action, d.rule, d.cooldown, d.hardening) == ("block", "risk-harden", 0.0, None)
        assert d.refused and d.unhardenable and "cannot be hardened" in d.reason
        assert d.technique == "AML.T0024.002"
        for protocol in ("v2", "v1", "mlflow"):
            assert decide(req(protocol=protocol), {"session.risk": 0.85}, sess(), policy().default).action == "harden"
        shadow = decide(req(protocol="custom"), {"session.risk": 0.85}, sess(),
                        policy(BASE.replace("mode: enforce", "mode: monitor")).default)
        assert (shadow.action, shadow.enforced, shadow.refused) == ("block", False, False)
        blocked = decide(req(protocol="custom"), {"ood.combined": 1.0, "session.risk": 0.85}, sess(),
                         policy().default)
        assert (blocked.rule, blocked.cooldown, blocked.unhardenable) == ("ood-block", None, False)

    def test_properties_and_in_operator(self) -> None:
        """Rules can test request properties; all conditions must hold."""
        p = policy().default
        assert decide(req(rows=101), {}, sess(), p).rule == "big-batch"
        assert decide(req(rows=101, model="other"), {}, sess(), p).action == "allow"
        assert decide(req(rows=100), {}, sess(), p).action == "allow"

    def test_missing_score_never_matches(self) -> None:
        """A score absent from this request does not satisfy a condition."""
        assert decide(req(), {}, sess(), policy().default).action == "allow"

    def test_rate_limited_throttles_with_retry_after(self) -> None:
        """A rate-limited session gets throttle with a Retry-After of at least 1 s."""
        d = decide(req(), {}, sess(rate_limited=True, retry_after=0.2), policy().default)
        assert (d.action, d.rule, d.retry_after) == ("throttle", "rate-limit", 1.0)

    def test_block_beats_throttle(self) -> None:
        """Block is more severe than throttle."""
        d = decide(req(), {"ood.combined": 1.0}, sess(rate_limited=True), policy().default)
        assert d.action == "block"

    def test_allow_list_short_circuits(self) -> None:
        """An allow-listed session is allowed whatever its scores."""
        d = decide(req(), {"ood.combined": 1.0}, sess("trusted"), policy().default)
        assert (d.action, d.rule) == ("allow", "allow-list")

    def test_deny_lists(self) -> None:
        """Deny-listed sessions and networks are blocked."""
        p = policy().default
        assert decide(req(), {}, sess("banned"), p).rule == "deny-list"
        assert decide(req(ip="203.0.113.9"), {}, sess(), p).rule == "deny-list"
        assert decide(req(ip="2001:db8::1"), {}, sess(), p).action == "allow"

    def test_rule_cooldown_overrides_policy_default(self) -> None:
        """A block rule's own cooldown_seconds travels with the decision; other rules leave it unset."""
        text = BASE.replace("    action: block\n", "    action: block\n    cooldown_seconds: 0\n", 1)
        d = decide(req(), {"ood.combined": 1.0}, sess(), policy(text).default)
        assert (d.action, d.cooldown) == ("block", 0.0)
        assert decide(req(), {"ood.combined": 1.0}, sess(), policy().default).cooldown is None

    def test_session_scores_needed_only_when_read(self) -> None:
        """The trackers run only when a loaded rule reads a session score."""
        assert policy().default.needs_session_scores
        assert not policy(available=BUILTIN_SCORES).default.needs_session_scores

    def test_blocked_session_stays_blocked(self) -> None:
        """During the cool-down, the session is blocked by the rule that blocked it."""
        d = decide(req(), {}, sess(blocked_rule="ood-block"), policy().default)
        assert (d.action, d.rule) == ("block", "ood-block")

    def test_fail_closed_and_open(self) -> None:
        """Scoring errors fail closed, budget overruns fail open, per policy."""
        p = policy().default
        assert decide(req(), {}, sess(), p, scoring_failure="error").action == "block"
        d = decide(req(), {}, sess(), p, scoring_failure="budget")
        assert (d.action, d.rule) == ("allow", "scoring-budget")

    def test_monitor_mode_decides_but_does_not_enforce(self) -> None:
        """In monitor mode the decision is computed but not enforced."""
        d = decide(req(), {"ood.combined": 0.99}, sess(), policy().models["lenient"])
        assert d.action == "flag"
        assert d.enforced is False
        assert not decide(req(), {"ood.combined": 1.0}, sess(), policy().models["lenient"]).refused

    def test_model_overrides(self) -> None:
        """Per-model overrides add and disable rules; other models use the default."""
        p = policy()
        assert "ood-block" not in [r.id for r in p.models["lenient"].rules]
        assert decide(req(model="strict"), {"ood.combined": 0.95}, sess(), p.for_model("strict")).rule == \
            "strict-any-ood"
        assert p.for_model("unknown") is p.default

    def test_skipped_rules_without_scores(self) -> None:
        """Rules naming unavailable scores are skipped at load time with a warning."""
        loaded = parse_policy(BASE, source="t.yaml", available_scores=BUILTIN_SCORES)
        assert {"ood-flag", "ood-block", "risk-harden"} <= set(loaded.policy.skipped_rules)
        assert [r.id for r in loaded.policy.default.rules] == ["big-batch"]


class TestPolicyStoreChecks:
    def test_checks_run_once_per_policy_and_may_refuse(self, tmp_path: Path) -> None:
        """A check sees the active policy when added and each policy a reload would activate, not the same
        policy again on every reload (a warning it logs is not repeated); its PolicyError rejects a reload and
        the last good policy stays."""
        path = tmp_path / "policy.yaml"
        path.write_text(BASE)
        store = PolicyStore(str(path), available_scores=SCORE_NAMES)
        seen: list[str] = []

        def check(p: Policy) -> None:
            seen.append(p.revision)
            if any(r.id == "forbidden" for r in p.default.rules):
                raise PolicyError(str(path), None, "rules", "forbidden rule")

        store.add_check(check)
        first = store.current.revision
        assert seen == [first]
        for _ in range(2):
            assert store.reload().ok and not store.reload().changed
        assert seen == [first], "an unchanged policy was checked again"
        path.write_text(BASE.replace("gte: 0.99}", "gte: 0.98}"))
        result = store.reload()
        assert result.ok and result.changed and seen == [first, result.revision]
        second = result.revision
        path.write_text(BASE.replace("id: big-batch", "id: forbidden"))
        rejected = store.reload()
        assert not rejected.ok and "forbidden rule" in (rejected.error or "")
        assert store.current.revision == second and len(seen) == 3
