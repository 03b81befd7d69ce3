"""`guard-agent fit`: fit a calibrated detector profile from reference data and print what it will do.

The CLI module wires `add_fit_arguments` and `run_fit` into its `fit` subcommand. Errors in the input are
reported as one clear line on stderr with exit status 2 (``guard_agent.commands._convention``), never as a
traceback.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detectors import COMBINED, Profile, ProfileError, fit_profile, load_reference, save_profile
from guard_agent.commands._convention import CommandError, warn
from guard_agent.fit_text import add_text_arguments, run_fit_text

from .policy.store import default_policy_text

_TIMING_REPEATS = 200
_SELF_CHECK_ROWS = 400
_SHARP_ROWS = 1000  # below this, p-values past 1/(rows + 1) rest on the fitted tails alone
_SEVERITY = {"flag": 1, "harden": 2, "throttle": 3, "block": 4}


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
        f"rows: {rows['reference']} reference, all used for calibration; target FPR {doc['fpr']}; "
        f"policy thresholds use the calibrated scale: score > {1 - float(doc['fpr']):.4g} ~ target FPR"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class StatelessRule:
    """A rule of the shipped default policy that fires on one detector score alone: `score >= threshold`."""

    rule_id: str
    score: str
    threshold: float
    action: str


def default_stateless_rules(text: str | None = None) -> tuple[StatelessRule, ...]:
    """The default policy's single-condition `gte` rules on profile scores (input.schema, ood.*)."""
    doc = yaml.safe_load(default_policy_text() if text is None else text)
    out = []
    for rule in doc.get("rules", []):
        when = rule.get("when", {})
        if len(when) != 1:
            continue
        ((score, cond),) = when.items()
        if (score == "input.schema" or score.startswith("ood.")) and set(cond) == {"gte"}:
            out.append(StatelessRule(rule["id"], score, float(cond["gte"]), str(rule["action"])))
    return tuple(out)


def _fired(profile: Profile, X: np.ndarray, rules: tuple[StatelessRule, ...], min_severity: int) -> float:
    scores = profile.score(X)
    hit = np.zeros(X.shape[0], dtype=bool)
    for rule in rules:
        if _SEVERITY.get(rule.action, 0) >= min_severity and rule.score in scores:
            hit |= scores[rule.score] >= rule.threshold
    return float(np.mean(hit))


def self_check(profile: Profile, X: np.ndarray, seed: int) -> dict[str, tuple[float, float]]:
    """Share of probe rows the default policy's stateless rules would (flag or more, block): uniform noise over
    the reference's feature ranges, and rows pushed ten range widths past the maxima of a quarter of the
    features. Not a detection benchmark: a quick look at whether this profile sees the absurd at all."""
    rng = np.random.default_rng(seed)
    lo, hi = X.min(axis=0), X.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    uniform = rng.uniform(lo, hi, size=(_SELF_CHECK_ROWS, X.shape[1]))
    beyond = X[rng.integers(0, X.shape[0], size=_SELF_CHECK_ROWS)].copy()
    n_out = max(1, X.shape[1] // 4)
    for row in beyond:
        cols = rng.choice(X.shape[1], size=n_out, replace=False)
        row[cols] = hi[cols] + 10 * span[cols]
    rules = default_stateless_rules()
    return {
        name: (_fired(profile, probe, rules, _SEVERITY["flag"]), _fired(profile, probe, rules, _SEVERITY["block"]))
        for name, probe in (("uniform noise inside the feature ranges", uniform),
                            (f"{n_out} feature(s) ten range widths past the maximum", beyond))
    }


def advice(profile: Profile, checks: dict[str, tuple[float, float]]) -> list[str]:
    """Plain lines on what this profile can and cannot do, and what to change (more rows, another --fpr)."""
    doc = profile.document
    n, fpr = int(doc["rows"]["calibration"]), float(doc["fpr"])
    folds = doc.get("calibration", {}).get("folds")
    lines = [f"calibration: all {n} reference rows, each scored by a model fitted without it ({folds}-fold "
             "cross-conformal); the profile's detectors are fitted on all rows"]
    floor = 1.0 / (n + 1)
    if fpr < floor:
        needed = math.ceil(1.0 / fpr) - 1
        lines.append(f"weak: with {n} rows no detector can fire at --fpr {fpr:g} (the smallest in-range p-value is "
                     f"1/{n + 1} = {floor:.3g}), so the thresholds above say never: give at least {needed} rows, "
                     f"or use --fpr {floor:.2g} or more")
    untailed = [name for name, det in profile.detectors.items() if det.tail_ is None]
    if untailed:
        lines.append(f"weak: no tail fitted for {', '.join(untailed)} (fewer than 20 rows or 10 distinct top "
                     f"scores): their p-values stop at {floor:.3g}, so they never reach the default policy's flag "
                     "and block thresholds on their own")
    if n < _SHARP_ROWS:
        lines.append(f"note: {n} rows: the default policy's flag (p < 1e-5) and block (p < 1e-9) thresholds lie past "
                     f"1/{n + 1} and rest on the fitted tails, which are conservative: only rows far beyond the "
                     f"reference reach them; {_SHARP_ROWS}+ rows give sharper tails")
    for name, (flagged, blocked) in checks.items():
        lines.append(f"self-check, {name}: {flagged:.0%} flagged or blocked, {blocked:.0%} blocked by the default "
                     "policy's per-request rules")
    weak = [name for name, (_, blocked) in checks.items() if blocked < 0.5]
    if weak:
        lines.append(f"weak: most {' and most '.join(weak)} is not blocked per request: with {n} rows such rows "
                     "are not far enough beyond the reference for the conservative tails (the session rules "
                     "still see repeated probing); more reference rows sharpen this")
    return lines


def _tracker_parts(X: np.ndarray, labels: np.ndarray | None, seed: int) -> dict[str, Any] | None:
    """The session trackers' projection, grid and quantisation, fitted on the same reference data
    (None, with a warning, when the data is too small for them: the guard then uses their defaults)."""
    from detectors.trackers import fit_tracker_config

    if X.ndim != 2 or X.shape[0] < 10:  # fit_profile refuses this data with its own message
        return None
    try:
        return {"trackers": fit_tracker_config(X, labels, seed=seed).to_parts()}
    except ValueError as exc:
        warn("guard-agent fit", f"session trackers not fitted ({exc}); the guard will use defaults")
        return None


def run_fit(args: argparse.Namespace) -> int:
    """Fit, save and summarise a profile. Returns 0; bad input or a refused overwrite raise ``CommandError``."""
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
        raise CommandError(str(exc)) from exc
    print(format_table(profile, X[:1]))
    for line in advice(profile, self_check(profile, X, args.seed)):
        print(line)
    print(f"wrote {out} (revision {profile.revision})")
    return 0
