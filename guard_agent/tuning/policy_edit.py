"""Write suggested thresholds into a policy file, keeping its comments and layout.

The file is composed (not loaded) with PyYAML so every scalar keeps its
position; only the numbers of score conditions are replaced. The target FPR is
for alerts (``flag``); actions that cost the client more get rarer targets:
``harden`` and ``throttle`` ``escalation`` times fewer false positives, ``block``
``escalation**2`` times fewer (a block also starts the session's cool-down, so
one false block costs a client every request for minutes). On one score the
stricter rule therefore never gets the lower threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import yaml

from guard_agent.policy.model import SCORE_NAMES
from guard_agent.tuning.thresholds import UNTUNED_SCORES

__all__ = ["TIERS", "Edit", "retune_policy_text"]

TIERS = {"allow": 0, "flag": 0, "harden": 1, "throttle": 1, "block": 2}
"""How many times ``escalation`` an action's target FPR is divided by."""

ThresholdFor = Callable[[str | None, str, float, float], float | None]
"""(model scope or None, score, target FPR, current threshold) -> new threshold, or None to leave it."""


@dataclass(frozen=True)
class Edit:
    scope: str           # "rules" or "models.<name>.rules"
    rule: str
    action: str
    score: str
    target_fpr: float
    old: str
    new: str | None      # None: left unchanged (no threshold reaches the target)


def _get(node: yaml.Node, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found: yaml.Node = v
            return found
    return None


def _rule_lists(root: yaml.Node) -> list[tuple[str, str | None, yaml.SequenceNode]]:
    out: list[tuple[str, str | None, yaml.SequenceNode]] = []
    rules = _get(root, "rules")
    if isinstance(rules, yaml.SequenceNode):
        out.append(("rules", None, rules))
    models = _get(root, "models")
    if isinstance(models, yaml.MappingNode):
        for k, v in models.value:
            sub = _get(v, "rules")
            if isinstance(sub, yaml.SequenceNode):
                out.append((f"models.{k.value}.rules", str(k.value), sub))
    return out


def _fmt(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".") if x < 1 else "1.0"


def retune_policy_text(text: str, threshold_for: ThresholdFor, *, target_fpr: float,
                       escalation: float = 10.0) -> tuple[str, list[Edit]]:
    """``text`` with every single-score ``gte``/``gt`` threshold replaced; the edits made."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        raise ValueError("empty policy")
    edits: list[Edit] = []
    replacements: list[tuple[int, int, str]] = []
    for scope, model, seq in _rule_lists(root):
        tiers: dict[str, list[tuple[int, str, str, yaml.ScalarNode]]] = {}
        for rule in seq.value:
            when = _get(rule, "when")
            action = _get(rule, "action")
            rid = _get(rule, "id")
            if not isinstance(when, yaml.MappingNode) or not isinstance(action, yaml.ScalarNode):
                continue
            score_items = [(k, v) for k, v in when.value if k.value in SCORE_NAMES]
            if len(score_items) != 1:
                continue  # a conjunction of scores has no single-score FPR: left for the operator
            key, cond = score_items[0]
            if key.value in UNTUNED_SCORES or not isinstance(cond, yaml.MappingNode):
                continue
            ops = [(k.value, v) for k, v in cond.value if k.value in ("gte", "gt")]
            if len(ops) != 1 or not isinstance(ops[0][1], yaml.ScalarNode):
                continue
            rule_id = str(getattr(rid, "value", "?"))
            tiers.setdefault(key.value, []).append((TIERS.get(action.value, 0), str(action.value), rule_id,
                                                    ops[0][1]))
        for score, rules in tiers.items():
            for tier, action_name, rule_name, node in rules:
                fpr = target_fpr / (escalation ** tier)
                try:
                    current = float(node.value)
                except ValueError:
                    continue
                threshold = threshold_for(model, score, fpr, current)
                new = None if threshold is None else _fmt(threshold)
                edits.append(Edit(scope, rule_name, action_name, score, fpr, str(node.value), new))
                if new is not None:
                    replacements.append((node.start_mark.index, node.end_mark.index, new))
    out = text
    for start, end, new in sorted(replacements, reverse=True):
        out = out[:start] + new + out[end:]
    return out, edits
