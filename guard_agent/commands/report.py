"""``guard-agent report``: one self-contained HTML file (plots embedded, no network fetches)."""

from __future__ import annotations

import argparse
from pathlib import Path

from guard_agent.commands._convention import OK, CommandError
from guard_agent.tuning._cli import add_capture_arguments, load_capture, load_labels

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_capture_arguments(parser, labels=True)
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--policy", help="mark this policy's thresholds (default: the last captured policy)")
    parser.add_argument("--title", default="inference-guard: captured traffic")


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CommandError("the report needs matplotlib: pip install 'inference-guard[report]'") from exc
    from guard_agent.policy.loader import PolicyError, load_policy_file
    from guard_agent.tuning.report import ReportInputs, render_report

    capture = load_capture(args.capture, prog=args.command_prog)
    labels = load_labels(args.labels)
    policy = None
    try:
        if args.policy:
            policy = load_policy_file(args.policy, available_scores=capture.available_scores()).policy
    except (OSError, PolicyError) as exc:
        raise CommandError(str(exc)) from exc
    page = render_report(ReportInputs(capture=capture, policy=policy, attack_sessions=labels, title=args.title))
    out = Path(args.out)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) // 1024} KiB, {len(capture.decisions)} decisions)")
    return OK
