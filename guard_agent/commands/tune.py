"""``guard-agent tune``: thresholds per score for a target false-positive rate on captured benign traffic.

Benign = every captured request, or every request outside the sessions listed in
``--labels``. Prints the trade-off per score and, with ``--out``, writes the base
policy (``--policy``, default the built-in one) with the suggested thresholds,
comments kept, validated before it is written. ``--json`` prints the trade-off and the edits as one JSON
document. Exit 2 on unusable input.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from guard_agent.commands._convention import OK, CommandError, add_json_argument, print_json
from guard_agent.tuning._cli import add_capture_arguments, load_capture, load_labels
from guard_agent.tuning.policy_edit import Edit, retune_policy_text
from guard_agent.tuning.records import Capture
from guard_agent.tuning.thresholds import TradeOff, scores_by_name, suggest, trade_off

__all__ = ["add_arguments", "format_trade_off", "run"]

GRID = (0.1, 0.01, 0.001, 0.0001)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_capture_arguments(parser, labels=True)
    parser.add_argument("--target-fpr", dest="target_fpr", type=float, default=0.001,
                        help="false-positive rate on benign requests for flag rules (default 0.001)")
    parser.add_argument("--escalation", type=float, default=10.0,
                        help="harden/throttle rules get this many times fewer false positives, block rules its "
                             "square (default 10)")
    parser.add_argument("--policy", help="base policy to rewrite (default: the built-in policy)")
    parser.add_argument("--out", help="write the tuned policy here")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_json_argument(parser, "the trade-off per score (and the edits written with --out)")


def _fmt(x: float | None, digits: int = 6) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}g}"


def format_trade_off(table: dict[str, list[TradeOff]], labelled: bool, target: float) -> str:
    header = (f"{'score':<28} {'target FPR':>10} {'threshold':>10} {'benign FPR':>10} {'benign n':>8} "
              f"{'benign sess.':>12}")
    if labelled:
        header += f" {'attack TPR':>10} {'attack sess.':>12}"
    lines = [header, "-" * len(header)]
    for name, rows in table.items():
        for row in rows:
            s = row.suggestion
            mark = "*" if s.target_fpr == target else " "
            line = (f"{name:<28} {_fmt(s.target_fpr):>9}{mark} {_fmt(s.threshold):>10} "
                    f"{_fmt(s.benign_fpr, 4):>10} {s.benign_n:>8} {_fmt(row.benign_sessions, 3):>12}")
            if labelled:
                line += f" {_fmt(row.attack_tpr, 3):>10} {_fmt(row.attack_sessions, 3):>12}"
            if not s.resolvable:
                line += "  (too little benign traffic: bound only)"
            elif s.degenerate and s.threshold is not None:
                line += "  (no benign tail: any value above the minimum fires)"
            if s.threshold is None:
                line += "  (unreachable: benign traffic scores 1.0)"
            lines.append(line)
    return "\n".join(lines)


def _edits_text(edits: list[Edit]) -> str:
    lines = []
    for e in edits:
        change = f"{e.old} -> {e.new}" if e.new is not None else f"{e.old} (kept: no data or no safe suggestion)"
        lines.append(f"  {e.scope}[{e.rule}] {e.action} when {e.score} >= {change}  (FPR {e.target_fpr:g})")
    return "\n".join(lines)


def _base_text(path: str | None) -> tuple[str, str]:
    if path is None:
        from guard_agent.policy.store import DEFAULT_POLICY_SOURCE, default_policy_text

        return default_policy_text(), DEFAULT_POLICY_SOURCE
    from guard_agent.policy.loader import resolve_policy_path

    target = resolve_policy_path(path)
    return target.read_text(encoding="utf-8"), str(target)


def write_policy(capture: Capture, labels: frozenset[str], args: argparse.Namespace) -> list[Edit]:
    """Write the base policy with tuned thresholds to ``args.out``; the edits made."""
    from guard_agent.policy.loader import PolicyError, parse_policy

    out = Path(args.out)
    if out.exists() and not args.force:
        raise CommandError(f"{out} exists (use --force)")
    text, source = _base_text(args.policy)
    benign = [d for d in capture.decisions if d.session not in labels]
    by_model: dict[str | None, dict[str, np.ndarray]] = {None: scores_by_name(benign)}

    def threshold_for(model: str | None, score: str, fpr: float, current: float) -> float | None:
        if model not in by_model:
            by_model[model] = scores_by_name(d for d in benign if d.model == model)
        values = by_model[model].get(score)
        if values is None or values.size == 0:
            return None
        s = suggest(score, values, fpr)
        if s.threshold is None or s.trustworthy:
            return s.threshold
        # too little data or no benign tail: only raise a threshold that benign traffic would cross
        return s.threshold if s.threshold > current else None

    new_text, edits = retune_policy_text(text, threshold_for, target_fpr=args.target_fpr,
                                         escalation=args.escalation)
    n = len(benign)
    header = (f"# Thresholds tuned by `guard-agent tune` from {n} benign requests "
              f"({len(capture.files)} capture file(s), {len(labels)} labelled attack sessions excluded),\n"
              f"# target FPR {args.target_fpr:g} for flag rules, /{args.escalation:g} for harden/throttle, "
              f"/{args.escalation ** 2:g} for block. Base: {source}\n")
    new_text = header + new_text
    try:
        parse_policy(new_text, source=str(out))
    except PolicyError as exc:  # never write a file the guard would refuse
        raise CommandError(f"the tuned policy does not validate: {exc}") from exc
    out.write_text(new_text, encoding="utf-8")
    return edits


def run(args: argparse.Namespace) -> int:
    if not 0 < args.target_fpr < 1 or args.escalation < 1:
        raise CommandError("--target-fpr must be in (0, 1) and --escalation >= 1")
    capture = load_capture(args.capture, prog=args.command_prog)
    labels = load_labels(args.labels)
    benign_decisions = [d for d in capture.decisions if d.session not in labels]
    attack = [d for d in capture.decisions if d.session in labels]
    known = {d.session for d in capture.decisions}
    if not args.json:
        print(f"{len(capture.decisions)} decisions, {len(benign_decisions)} benign, {len(attack)} from "
              f"{len(labels & known)} labelled attack session(s)"
              + (f" ({len(labels - known)} labelled sessions not in the capture)" if labels - known else ""))
    if not scores_by_name(benign_decisions):
        raise CommandError("no tunable scores in the benign traffic (is a profile loaded?)")
    table = trade_off(benign_decisions, attack if labels else None, (*GRID, args.target_fpr))
    if not args.json:
        print(format_trade_off(table, bool(labels), args.target_fpr))
        print("(* = the target FPR; thresholds apply as `gte`; benign FPR and sess. (sessions with at least one "
              "request\n at or above) are measured on the captured benign traffic; a policy threshold is lowered "
              "only where the\n suggestion is resolvable and the benign traffic has a tail)")
    edits: list[Edit] = []
    if args.out:
        try:
            edits = write_policy(capture, labels, args)
        except (OSError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
    if args.json:
        print_json({"decisions": len(capture.decisions), "benign": len(benign_decisions), "attack": len(attack),
                    "trade_off": {name: [{**dataclasses.asdict(row.suggestion), "benign_sessions": row.benign_sessions,
                                          "attack_tpr": row.attack_tpr, "attack_sessions": row.attack_sessions}
                                         for row in rows] for name, rows in table.items()},
                    "out": args.out, "edits": [dataclasses.asdict(e) for e in edits]})
    elif args.out:
        print(f"\nwrote {args.out} ({sum(e.new is not None for e in edits)} thresholds changed):")
        print(_edits_text(edits))
    return OK
