"""`guard-agent fit --text`: a text profile from reference texts (a file of lines, or a CSV column).

Kept apart from the numeric fit: the texts are hashed and projected (``detectors.text``), the detectors,
calibration and session trackers are then fitted on the projection exactly as for numeric data.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from detectors import ProfileError, save_profile
from detectors.text import CHECK_NAMES, TextModel, fit_text_profile
from guard_agent.commands._convention import CommandError

__all__ = ["add_text_arguments", "load_texts", "run_fit_text"]

_MAX_REFERENCE_BYTES = 512 << 20


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The text options of `fit`."""
    parser.add_argument("--text", action="store_true",
                        help="--data holds reference texts: a UTF-8 file of one text per line, or a CSV with a "
                             "header (--text-column names the text column)")
    parser.add_argument("--text-column", default="text", help="CSV column holding the texts (default text)")
    parser.add_argument("--components", type=int, default=32,
                        help="dimensions of the fitted text projection (default 32)")


def load_texts(path: Path, *, text_column: str = "text",
               label_column: str | None = None) -> tuple[list[str], np.ndarray | None]:
    """Reference texts (empty lines skipped) and, for a CSV with ``label_column``, their labels."""
    if path.stat().st_size > _MAX_REFERENCE_BYTES:
        raise ProfileError(f"{path}: larger than {_MAX_REFERENCE_BYTES >> 20} MiB")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix.lower() != ".csv":
        if label_column is not None:
            raise ProfileError("--label-column needs a CSV file")
        return [line for line in raw.splitlines() if line.strip()], None
    rows = list(csv.DictReader(raw.splitlines()))
    if not rows or text_column not in rows[0]:
        raise ProfileError(f"{path}: no column {text_column!r} (set --text-column)")
    if label_column is not None and label_column not in rows[0]:
        raise ProfileError(f"{path}: no column {label_column!r}")
    kept = [r for r in rows if (r[text_column] or "").strip()]
    labels = None if label_column is None else np.array([r[label_column] for r in kept])
    return [r[text_column] for r in kept], labels


def run_fit_text(args: argparse.Namespace) -> int:
    """Fit, save and summarise a text profile; 0 ok, 1 on bad input (one line on stderr)."""
    out: Path = args.out
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            raise ProfileError(f"{out}: already exists; pass --force to replace it")
        if args.labels is not None:
            raise ProfileError("--labels is for numeric data; give text labels with --label-column in a CSV")
        texts, labels = load_texts(args.data, text_column=args.text_column, label_column=args.label_column)
        detectors = None if args.detectors is None else [d for d in args.detectors.split(",") if d.strip()]
        started = time.perf_counter()
        profile, _ = fit_text_profile(texts, labels=labels, n_components=args.components, fpr=args.fpr,
                                      seed=args.seed, detectors=detectors, clock=time.perf_counter)
        save_profile(profile, out, force=args.force)
    except (ProfileError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from exc
    model = TextModel.from_profile(profile)
    assert model is not None
    print(f"text profile: {len(texts)} reference texts, {model.projection.n_components} components over "
          f"{model.projection.columns_.size} hashed n-gram columns, fitted in {time.perf_counter() - started:.1f} s")
    doc = profile.document
    for name, entry in doc["detectors"].items():
        print(f"  {name:<18} threshold {entry['threshold']}  calibration FPR {entry['calibration_fpr']:.4f}")
    print(f"  checks: {', '.join(CHECK_NAMES)} (calibrated against the reference texts)")
    print(f"wrote {out} (revision {profile.revision})")
    return 0
