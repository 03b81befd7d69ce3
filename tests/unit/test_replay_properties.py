"""Property: replay reproduces decide() on exact scores although the capture holds 6-decimal scores."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from guard_agent.policy import RequestFacts, SessionFacts, decide, parse_policy
from guard_agent.tuning import read_capture, replay
from tests.unit.test_replay import Recorder, policy_text

ACTIONS = ("flag", "harden", "block")


def policy_doc(t_low: float, t_high: float, t_knn: float, actions: tuple[str, str, str]) -> dict[str, Any]:
    return {"version": 1, "block": {"cooldown_seconds": 0}, "rules": [
        {"id": "low", "when": {"ood.combined": {"gte": t_low}}, "action": actions[0]},
        {"id": "high", "when": {"ood.combined": {"gte": t_high}}, "action": actions[1]},
        {"id": "schema", "when": {"input.schema": {"gte": 1.0}}, "action": "block"},
        {"id": "knn-batch", "when": {"ood.knn": {"gt": t_knn}, "request.rows": {"gt": 1}}, "action": actions[2]},
    ]}


thresholds = st.integers(500_000, 999_000).map(lambda n: n / 1_000_000)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[tuple[dict[str, float], int]]]:
    t_low = draw(thresholds)
    t_high = min(0.999999, t_low + draw(st.integers(10, 100_000)) / 1_000_000)
    t_knn = draw(thresholds)
    near = [t_low, t_high, t_knn, 1.0]

    def score() -> st.SearchStrategy[float]:
        close = st.tuples(st.sampled_from(near), st.integers(-6, 6)).map(
            lambda p: min(1.0, max(0.0, p[0] + p[1] * 1e-7)))
        return st.one_of(st.floats(0, 1), close)

    requests = draw(st.lists(st.tuples(st.fixed_dictionaries(
        {"ood.combined": score(), "input.schema": score(), "ood.knn": score()}), st.integers(1, 3)),
        min_size=1, max_size=15))
    a = policy_doc(t_low, t_high, t_knn, tuple(draw(st.permutations(ACTIONS))))  # type: ignore[arg-type]
    b = policy_doc(t_low, t_high, t_knn, tuple(draw(st.permutations(ACTIONS))))  # type: ignore[arg-type]
    return a, b, requests


def exact(doc: dict[str, Any], scores: dict[str, float], rows: int, session: str) -> tuple[str, str, tuple[str, ...]]:
    policy = parse_policy(policy_text(doc)).policy.default
    d = decide(RequestFacts(model="digits", protocol="v2", rows=rows, body_bytes=200, features=64),
               scores, SessionFacts(id=session, source="header"), policy)
    return d.action, d.rule, d.matched


@settings(max_examples=60, deadline=None)
@given(scenario())
def test_replay_equals_exact_decisions(case: tuple[dict[str, Any], dict[str, Any], list[Any]]) -> None:
    """Re-deciding under the captured policy changes nothing, and under a policy with the same thresholds but
    other actions it changes exactly what decide() on the unrounded scores would."""
    a, b, requests = case
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(Path(tmp) / "cap.jsonl", doc=a)
        expected_changes = set()
        for i, (scores, rows) in enumerate(requests):
            session = f"{i:032d}"
            action, rule, matched = exact(a, scores, rows, session)
            rec.add(f"r{i}", float(i), scores, action, rule, matched, session=session, rows=rows)
            if exact(b, scores, rows, session)[0] != action:
                expected_changes.add(f"r{i}")
        cap = read_capture([rec.write()])
    same = replay(cap, parse_policy(policy_text(a)).policy)
    assert same.changes == [] and same.fidelity_mismatches == []
    other = replay(cap, parse_policy(policy_text(b)).policy)
    assert {c.request_id for c in other.changes} == expected_changes
