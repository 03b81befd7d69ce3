"""`guard-agent fit`: fit a calibrated detector profile from reference data and print what it will do.

The CLI module wires `add_fit_arguments` and `run_fit` into its `fit` subcommand. Errors in the input are
reported as one clear line on stderr with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from detectors import COMBINED, Profile, ProfileError, fit_profile, load_reference, save_profile
from guard_agent.fit_text import add_text_arguments, run_fit_text

_TIMING_REPEATS = 200


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the `fit` options (DESIGN.md "CLI")."""
    parser.add_argument("--data", required=True, type=Path, help="reference data: REF.npy (2-D) or numeric REF.csv")
    parser.add_argument("--out", required=True, type=Path, help="profile directory to write")
    parser.add_argument("--labels", type=Path, default=None, help="optional Y.npy with one class label per row")
    parser.add_argument("--label-column", default=None, help="CSV column holding the labels (dropped from X)")
    parser.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the split and the randomised fits")
    parser.add_argument(
        "--detectors",
        default=None,
        help="comma-separated subset, e.g. schema,mahalanobis,knn,pca,iforest (default: all)",
    )
    parser.add_argument("--combine", choices=("min", "fisher"), default="min", help="p-value combination (default min)")
    parser.add_argument("--force", action="store_true", help="replace an existing profile directory")
    add_text_arguments(parser)


def _load_labels(path: Path, n_rows: int) -> np.ndarray:
    if path.suffix.lower() != ".npy":
        raise ProfileError(f"{path}: labels must be a .npy file")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ProfileError(f"{path}: not a readable pickle-free .npy array ({exc})") from exc
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise ProfileError(f"{path}: expected {n_rows} labels (one per reference row), got shape {labels.shape}")
    return np.asarray(labels)


def _per_row_micros(fn: Callable[[], object]) -> float:
    """Median wall time of one call in microseconds (a CLI measurement; the library reads no clock)."""
    fn()
    samples = []
    for _ in range(_TIMING_REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _fmt_threshold(value: object) -> str:
    return "never (too few rows)" if value is None else f"{float(value):.6g}"  # type: ignore[arg-type]


def format_table(profile: Profile, row: np.ndarray) -> str:
    """The summary table: detector, threshold, calibration FPR, fit time, per-request score time."""
    doc = profile.document
    header = f"{'detector':<18} {'threshold':>22} {'calib FPR':>10} {'fit s':>8} {'score us/row':>13}"
    lines = [header, "-" * len(header)]
    x32 = row.astype(np.float32)
    for name, det in profile.detectors.items():
        entry = doc["detectors"][name]
        micros = _per_row_micros(lambda det=det: det.score_samples(x32))  # type: ignore[misc]
        fit_s = profile.fit_seconds.get(name, float("nan"))
        lines.append(
            f"{name:<18} {_fmt_threshold(entry['threshold']):>22} {entry['calibration_fpr']:>10.4f} "
            f"{fit_s:>8.3f} {micros:>13.1f}"
        )
    comb = doc["combined"]
    total = _per_row_micros(lambda: profile.score(row))
    lines.append(
        f"{COMBINED:<18} {_fmt_threshold(comb['threshold']):>22} {comb['calibration_fpr']:>10.4f} "
        f"{'':>8} {total:>13.1f}  (all detectors + combination, Profile.score)"
    )
    rows = doc["rows"]
    lines.append(
        f"rows: {rows['fit']} fit + {rows['calibration']} calibration; target FPR {doc['fpr']}; "
        f"policy thresholds use the calibrated scale: score > {1 - float(doc['fpr']):.4g} ~ target FPR"
    )
    return "\n".join(lines)


def _tracker_parts(X: np.ndarray, labels: np.ndarray | None, seed: int) -> dict[str, Any] | None:
    """The session trackers' projection, grid and quantisation, fitted on the same reference data
    (None, with a warning, when the data is too small for them: the guard then uses their defaults)."""
    from detectors.trackers import fit_tracker_config

    if X.ndim != 2 or X.shape[0] < 10:  # fit_profile refuses this data with its own message
        return None
    try:
        return {"trackers": fit_tracker_config(X, labels, seed=seed).to_parts()}
    except ValueError as exc:
        print(f"guard-agent fit: warning: session trackers not fitted ({exc}); the guard will use defaults",
              file=sys.stderr)
        return None


def run_fit(args: argparse.Namespace) -> int:
    """Fit, save and summarise a profile. Returns the exit status (0 ok, 1 bad input or refused overwrite)."""
    if args.text:
        return run_fit_text(args)
    out: Path = args.out
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            raise ProfileError(f"{out}: already exists; pass --force to replace it")
        X, labels, names = load_reference(args.data, label_column=args.label_column)
        if args.labels is not None:
            if labels is not None:
                raise ProfileError("give labels either with --labels or with --label-column, not both")
            labels = _load_labels(args.labels, X.shape[0])
        detectors = None if args.detectors is None else [d for d in args.detectors.split(",") if d.strip()]
        profile = fit_profile(
            X,
            labels=labels,
            fpr=args.fpr,
            seed=args.seed,
            detectors=detectors,
            feature_names=names,
            combine=args.combine,
            clock=time.perf_counter,
            extra_components=_tracker_parts(X, labels, args.seed),
        )
        save_profile(profile, out, force=args.force)
    except (ProfileError, ValueError, OSError) as exc:
        print(f"guard-agent fit: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(profile, X[:1]))
    print(f"wrote {out} (revision {profile.revision})")
    return 0
