"""Argument helpers shared by the replay, tune and report subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from guard_agent.commands._convention import CommandError, warn
from guard_agent.tuning.records import Capture, read_capture, read_labels

__all__ = ["add_capture_arguments", "capture_key", "load_capture", "load_labels", "pct"]


def add_capture_arguments(parser: argparse.ArgumentParser, *, labels: bool = False) -> None:
    parser.add_argument("--capture", nargs="+", required=True, metavar="FILE",
                        help="capture files or directories (GUARD_CAPTURE_DIR), or decision-event logs")
    if labels:
        parser.add_argument("--labels", metavar="FILE",
                            help="attack sessions, one guard.session hash per line (the rest counts as benign)")


def load_capture(paths: list[str], *, prog: str, with_features: bool = False) -> Capture:
    """The capture; ``CommandError`` when nothing usable was found (``prog`` names the command in warnings)."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise CommandError(f"no such capture file or directory: {', '.join(missing)}")
    capture = read_capture(paths, with_features=with_features)
    if not capture.decisions:
        raise CommandError(f"no inference decisions in {len(capture.files)} file(s)")
    if capture.skipped_lines:
        warn(prog, f"skipped {capture.skipped_lines} unreadable line(s)")
    return capture


def load_labels(path: str | None) -> frozenset[str]:
    """The labelled attack sessions; ``CommandError`` when the file cannot be read."""
    try:
        return read_labels(path) if path else frozenset()
    except OSError as exc:
        raise CommandError(f"cannot read labels: {exc}") from exc


def capture_key(path: str | None) -> str | None:
    """The capture key: ``--capture-key-file``, else ``GUARD_CAPTURE_KEY_FILE``, else ``GUARD_CAPTURE_KEY``."""
    path = path or os.environ.get("GUARD_CAPTURE_KEY_FILE")
    if path:
        return Path(path).read_text(encoding="utf-8").strip()
    return os.environ.get("GUARD_CAPTURE_KEY") or None


def pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"
