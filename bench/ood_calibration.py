"""OOD calibration across datasets and reference sizes (not a test): is the calibrated scale honest on rows the
fit never saw, and do absurd inputs reach the default policy's block threshold?

Run: .venv/bin/python bench/ood_calibration.py [--quick] [--sizes 100,300,1000,5000] [--splits 3]

For each dataset and reference size N: N rows (a random subset of the data) fit a profile with `fit_profile`
(default detectors, fpr 0.01, no labels); the rows it never saw are the benign held-out set. Over `--splits`
random splits it prints, pooled:

* benign: the share of held-out rows with `ood.combined` >= 0.99 (the fit's target FPR, must be <= ~0.01),
  flagged (the default policy's `ood-suspicious`) and blocked (`ood-extreme` or `input-out-of-range`); and
  the largest per-detector share at >= 0.99 (every detector must be honest, not only the combination).
* absurd inputs, the share flagged / blocked: uniform noise over the reference's feature ranges, heavy noise
  (held-out rows + Gaussian noise with sigma = 15% of each feature's range), and three features mirrored
  (x -> min + max - x for three random features of a held-out row, inside the observed range).

The thresholds are read from guard_agent/default_policy.yaml at run time. Datasets: scikit-learn's bundled
wine (178 rows, 13 features), breast_cancer (569, 30), diabetes in raw units (442, 10: integer age, sex and
serum columns with many exact repeats), digits (1,797, 64, integers 0..16), digits with one-pixel shifts
(8,985 rows: the only bundled image set large enough for a 5,000-row reference), and a 128-d Gaussian random
projection of the shifted digits (an embedding-like dense input). Sizes larger than the data minus 50 held-out
rows are skipped.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine

from detectors import COMBINED, Profile, fit_profile

warnings.filterwarnings("ignore")
POLICY = Path(__file__).resolve().parent.parent / "guard_agent" / "default_policy.yaml"
MIN_HELD_OUT = 50


def policy_rules(path: Path = POLICY) -> tuple[float, float, float]:
    """(flag threshold on ood.combined, block threshold on ood.combined, block threshold on input.schema)."""
    rules = {r["id"]: r for r in yaml.safe_load(path.read_text())["rules"]}

    def gte(rule_id: str, score: str) -> float:
        return float(rules[rule_id]["when"][score]["gte"])

    return gte("ood-suspicious", COMBINED), gte("ood-extreme", COMBINED), gte("input-out-of-range", "input.schema")


def _shifted_digits() -> np.ndarray:
    X = load_digits().data.reshape(-1, 8, 8)
    shifts = [X, np.roll(X, 1, axis=1), np.roll(X, -1, axis=1), np.roll(X, 1, axis=2), np.roll(X, -1, axis=2)]
    return np.concatenate(shifts).reshape(-1, 64)


def _projected_digits() -> np.ndarray:
    X = _shifted_digits()
    proj = np.random.default_rng(12).normal(size=(64, 128)) / np.sqrt(64)
    return X @ proj


DATASETS: dict[str, Callable[[], np.ndarray]] = {
    "wine": lambda: load_wine().data,
    "breast_cancer": lambda: load_breast_cancer().data,
    "diabetes-raw": lambda: load_diabetes(scaled=False).data,
    "digits": lambda: load_digits().data,
    "digits-shifted": _shifted_digits,
    "digits-proj128": _projected_digits,
}


def absurd_inputs(ref: np.ndarray, held: np.ndarray, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Uniform noise over the reference ranges, heavy noise, three mirrored features (see the module doc)."""
    lo, hi = ref.min(axis=0), ref.max(axis=0)
    base = held[rng.integers(0, held.shape[0], size=n)]
    mirrored = base.copy()
    for row in mirrored:
        cols = rng.choice(ref.shape[1], size=3, replace=False)
        row[cols] = lo[cols] + hi[cols] - row[cols]
    return {
        "uniform": rng.uniform(lo, hi, size=(n, ref.shape[1])),
        "heavy noise": base + rng.normal(size=base.shape) * 0.15 * (hi - lo),
        "mirror 3": mirrored,
    }


def rates(profile: Profile, X: np.ndarray, flag: float, block: float, schema_block: float) -> dict[str, float]:
    s = profile.score(X)
    blocked = (s[COMBINED] >= block) | (s["input.schema"] >= schema_block)
    per_detector = max(float(np.mean(v >= 0.99)) for k, v in s.items() if k != COMBINED)
    return {
        "at_fpr": float(np.mean(s[COMBINED] >= 0.99)),
        "worst_det": per_detector,
        "flag": float(np.mean((s[COMBINED] >= flag) | blocked)),
        "block": float(np.mean(blocked)),
    }


def run(datasets: list[str], sizes: list[int], splits: int, n_absurd: int) -> None:
    flag, block, schema_block = policy_rules()
    print(f"policy: flag ood.combined >= {flag}, block ood.combined >= {block:.10g} or input.schema >= "
          f"{schema_block:.10g}; fit fpr 0.01; {splits} splits; absurd rows per split: {n_absurd}")
    head = (f"{'dataset':<15} {'N':>5} {'held':>6} | {'ben>=.99':>8} {'worstdet':>8} {'flag':>7} {'block':>7} | "
            f"{'unif flag/block':>15} {'heavy flag/block':>16} {'mirror3 flag/block':>18} | {'fit s':>6}")
    print(head)
    print("-" * len(head))
    for name in datasets:
        X_all = DATASETS[name]().astype(np.float64)
        for size in sizes:
            if size > X_all.shape[0] - MIN_HELD_OUT:
                continue
            benign: list[dict[str, float]] = []
            held_total = 0
            absurd: dict[str, list[dict[str, float]]] = {}
            fit_s = 0.0
            for split in range(splits):
                rng = np.random.default_rng(1000 * split + size)
                perm = rng.permutation(X_all.shape[0])
                ref, held = X_all[perm[:size]], X_all[perm[size:]]
                start = time.process_time()
                profile = fit_profile(ref, fpr=0.01, seed=split)
                fit_s += time.process_time() - start
                r = rates(profile, held, flag, block, schema_block)
                benign.append({k: v * held.shape[0] for k, v in r.items()})
                held_total += held.shape[0]
                for kind, Xa in absurd_inputs(ref, held, rng, n_absurd).items():
                    absurd.setdefault(kind, []).append(rates(profile, Xa, flag, block, schema_block))
            b = {k: sum(d[k] for d in benign) / held_total for k in benign[0]}
            cells = []
            for kind in ("uniform", "heavy noise", "mirror 3"):
                fl = float(np.mean([d["flag"] for d in absurd[kind]]))
                bl = float(np.mean([d["block"] for d in absurd[kind]]))
                cells.append(f"{fl:>7.2f}/{bl:<6.2f}")
            print(
                f"{name:<15} {size:>5} {held_total:>6} | {b['at_fpr']:>8.4f} {b['worst_det']:>8.4f} "
                f"{b['flag']:>7.4f} {b['block']:>7.4f} | {cells[0]:>15} {cells[1]:>16} {cells[2]:>18} | "
                f"{fit_s / splits:>6.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one split, 100 and 300 rows, 200 absurd rows")
    parser.add_argument("--sizes", default="100,300,1000,5000")
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--absurd", type=int, default=500, help="absurd rows per kind and split")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    splits, n_absurd = args.splits, args.absurd
    if args.quick:
        sizes, splits, n_absurd = [s for s in sizes if s <= 300] or [100], 1, 200
    run([d.strip() for d in args.datasets.split(",")], sizes, splits, n_absurd)


if __name__ == "__main__":
    main()
