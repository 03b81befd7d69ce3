"""``guard-agent replay``: re-decide captured traffic under a new policy and print what changes.

Exit codes: 0 done; 1 with ``--fail-on-new-blocks`` when some request would newly
be blocked; 2 when the capture or the policy cannot be used. ``--json`` prints the result's fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

from guard_agent.commands._convention import FAILED, OK, CommandError, add_json_argument, print_json, warn
from guard_agent.tuning._cli import add_capture_arguments, capture_key, load_capture, load_labels, pct
from guard_agent.tuning.records import Capture, CapturedDecision
from guard_agent.tuning.replay import Change, ReplayResult, Rescorer, replay

__all__ = ["add_arguments", "format_result", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_capture_arguments(parser, labels=True)
    parser.add_argument("--policy", required=True, help="the policy to replay (file or directory with policy.yaml)")
    parser.add_argument("--fail-on-new-blocks", dest="fail_on_new_blocks", action="store_true",
                        help="exit 1 when any captured request would newly be blocked (for CI); with --labels, "
                             "only requests outside the labelled attack sessions count")
    parser.add_argument("--profile", help="re-score detector scores under this profile (needs encrypted features)")
    parser.add_argument("--capture-key-file", dest="capture_key_file",
                        help="the capture key (default: GUARD_CAPTURE_KEY_FILE or GUARD_CAPTURE_KEY)")
    parser.add_argument("--examples", type=int, default=3, help="request ids shown per line (default 3)")
    parser.add_argument("--top", type=int, default=10, help="rows per breakdown (default 10)")
    add_json_argument(parser, "the replay result (every changed decision)")


def _rescorer(args: argparse.Namespace, policy: Any) -> Rescorer | None:
    if not args.profile:
        return None
    from guard_agent.profiles import ProfileStore
    from guard_agent.scoring import ScoringContext
    from guard_agent.tuning.sealing import SealError, derive_key, open_features

    secret = capture_key(args.capture_key_file)
    if secret is None:
        raise ValueError("--profile re-scores captured features: give the capture key (--capture-key-file)")
    key = derive_key(secret)
    store = ProfileStore(args.profile)

    def rescore(d: CapturedDecision) -> Mapping[str, float] | None:
        if d.sealed is None:
            return None
        try:
            features = open_features(d.sealed, key, associated=d.request_id)
        except SealError:
            return None
        ctx = ScoringContext(features=features, row_shape=(features.shape[1],), model=d.model, protocol=d.protocol,
                             body=b"", policy=policy.for_model(d.model), extra={})
        return store.score(ctx)

    return rescore


def _breakdown(title: str, counts: list[tuple[str, int]], result: ReplayResult, key: Callable[[Change], Any],
               examples: int) -> list[str]:
    if not counts:
        return []
    width = max(len(k) for k, _ in counts)
    lines = [f"\n{title}:"]
    for k, n in counts:
        ids = ", ".join(result.examples(key, k, examples))
        lines.append(f"  {k:<{width}}  {n:>7}  e.g. {ids}")
    return lines


def format_result(result: ReplayResult, capture: Capture, policy_label: str, *, examples: int = 3,
                  top: int = 10) -> str:
    """The human-readable diff."""
    from guard_agent.tuning.replay import deciding_rule

    lines = [f"replayed {result.total} decisions from {len(capture.files)} file(s) under {policy_label}"]
    if result.fidelity_checked:
        same = result.fidelity_checked - len(result.fidelity_mismatches)
        lines.append(f"captured policy re-decided: {same}/{result.fidelity_checked} identical"
                     + (f" (differ: {', '.join(result.fidelity_mismatches[:examples])})"
                        if result.fidelity_mismatches else ""))
    if result.rescored or result.unsealed_missing:
        lines.append(f"re-scored under the new profile: {result.rescored}; without usable sealed features "
                     f"(kept captured scores): {result.unsealed_missing}")
    lines.append(f"changed: {len(result.changes)} ({pct(len(result.changes), result.total)}); "
                 f"newly blocked: {len(result.new_blocks)}; same action, other rule: {result.rule_only}; "
                 f"inexact: {result.inexact}")
    before = ", ".join(f"{a} {n}" for a, n in result.before_counts.most_common())
    after = ", ".join(f"{a} {n}" for a, n in result.after_counts.most_common())
    lines.append(f"  captured: {before}\n  replayed: {after}")
    transitions = [(f"{a} -> {b}", n) for (a, b), n in result.transitions().most_common()]
    lines += _breakdown("from -> to", transitions, result, lambda c: f"{c.before} -> {c.after}", examples)
    lines += _breakdown("by rule", result.by_rule().most_common(top), result, deciding_rule, examples)
    lines += _breakdown("by model", result.by_model().most_common(top), result, lambda c: c.model or "-", examples)
    lines += _breakdown("by session", [(s[:16], n) for s, n in result.by_session().most_common(top)], result,
                        lambda c: c.session[:16], examples)
    notes = list(result.notes)
    if result.carried_cooldowns:
        notes.append(f"{result.carried_cooldowns} decisions of sessions already in a block cool-down when the "
                     "capture began keep their captured decision")
    if result.inexact:
        notes.append(f"{result.inexact} decisions depend on state the capture cannot rebuild exactly "
                     "(simulated rate limits, cool-downs before the capture, session scores after an earlier "
                     "changed decision)")
    if notes:
        lines.append("\nnotes:")
        lines += [f"  - {n}" for n in notes]
    return "\n".join(lines)


def _result_fields(result: ReplayResult) -> dict[str, Any]:
    """The result as JSON-ready fields; the action counters as plain dicts (``dataclasses.asdict`` rebuilds a
    ``Counter`` from its items, which counts the pairs instead of copying the counts)."""
    fields = dataclasses.asdict(result)
    fields["before_counts"], fields["after_counts"] = dict(result.before_counts), dict(result.after_counts)
    return fields


def run(args: argparse.Namespace) -> int:
    from guard_agent.policy.loader import PolicyError, load_policy_file

    capture = load_capture(args.capture, prog=args.command_prog, with_features=bool(args.profile))
    try:
        loaded = load_policy_file(args.policy, available_scores=capture.available_scores())
    except PolicyError as exc:
        raise CommandError(str(exc)) from exc
    for warning in loaded.warnings:
        warn(args.command_prog, f"{warning} (not computed while capturing)")
    try:
        rescore = _rescorer(args, loaded.policy)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from exc
    labels = load_labels(args.labels)
    result = replay(capture, loaded.policy, rescore=rescore)
    failing = [c for c in result.new_blocks if c.session not in labels]
    if args.json:
        print_json({"policy": {"source": loaded.policy.source, "revision": loaded.policy.revision},
                    **_result_fields(result), "new_blocks_outside_labels": [c.request_id for c in failing]})
    else:
        label = f"{loaded.policy.source} (revision {loaded.policy.revision[:12]})"
        print(format_result(result, capture, label, examples=args.examples, top=args.top))
        if labels:
            print(f"\nnewly blocked outside the {len(labels)} labelled attack session(s): {len(failing)}"
                  + (f" (e.g. {', '.join(c.request_id for c in failing[:args.examples])})" if failing else ""))
    if args.fail_on_new_blocks and failing:
        where = " outside the labelled attack sessions" if labels else ""
        print(f"\nFAIL: {len(failing)} captured request(s){where} would newly be blocked", file=sys.stderr)
        return FAILED
    return OK
