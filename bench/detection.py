"""Detection-quality benchmark (not a test): AUROC and TPR at 1% FPR for every detector and the combined score,
on data the fit never saw, and what the default policy's stateless rules do to benign perturbations.
Run: /work/venv/bin/python bench/detection.py [--quick]

* AUROC uses the raw scores (ties in the calibrated scale would blur the ranking).
* TPR@1% is the real operating point: the share of anomalous rows with calibrated score > 0.99, the policy
  threshold for a 1% false-positive rate; `FPR` shows what that threshold did on the in-distribution test rows.
* Adversarial rows are only counted when the attack succeeded (the prediction changed).
* "benign perturbations": the share of rows at or above each stateless threshold of the shipped default policy
  (guard_agent/default_policy.yaml, read at run time) for held-out rows, one-pixel shifts, small noise and
  rounding, next to far-out rows for contrast. Flags on perturbed rows are expected; hardening or blocking them
  is what the thresholds must avoid.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from detectors import COMBINED, Profile, fit_profile

warnings.filterwarnings("ignore")
NAMES = ("input.schema", "ood.mahalanobis", "ood.knn", "ood.pca", "ood.iforest", COMBINED)
SHORT = {n: n.split(".")[-1] for n in NAMES}
POLICY = Path(__file__).resolve().parent.parent / "guard_agent" / "default_policy.yaml"
STATELESS_RULES = ("ood-suspicious", "ood-extreme", "input-out-of-range")


def policy_thresholds(path: Path = POLICY) -> list[tuple[str, str, float, str]]:
    """(rule id, score, gte threshold, action) of the default policy's stateless detector rules."""
    doc = yaml.safe_load(path.read_text())
    out = []
    for rule in doc["rules"]:
        if rule["id"] in STATELESS_RULES:
            ((score, cond),) = rule["when"].items()
            out.append((rule["id"], score, float(cond["gte"]), rule["action"]))
    return out


def threshold_header(title: str, rules: list[tuple[str, str, float, str]]) -> list[str]:
    cols = " ".join(f"{f'{rid} ({action})':>28}" for rid, _, _, action in rules)
    line = f"{'rows at or above the threshold':<34} {'n':>5} {cols}"
    sub = f"{'':<34} {'':>5} " + " ".join(f"{f'{score} >= {t:.10g}':>28}" for _, score, t, _ in rules)
    return [f"\n== {title}", line, sub, "-" * len(line)]


def threshold_row(profile: Profile, X: np.ndarray, label: str, rules: list[tuple[str, str, float, str]]) -> str:
    """Share of rows each stateless rule would fire on (the policy's gte on the calibrated score)."""
    scores = profile.score(X)
    cells = [f"{float(np.mean(scores[score] >= t)):>28.4f}" for _, score, t, _ in rules]
    return f"{label:<34} {len(X):>5} " + " ".join(cells)


def benign_digits(profile: Profile, X_te: np.ndarray, seed: int, rules: list[tuple[str, str, float, str]]) -> list[str]:
    """Held-out digits and benign perturbations of them (the traffic bench/attacks.py sends), far-out rows below."""
    rng = np.random.default_rng(seed + 1)
    imgs = X_te.reshape(-1, 8, 8)
    cases = {
        "held-out digits (in-distribution)": X_te,
        "one-pixel shift right": np.roll(imgs, 1, axis=2).reshape(-1, 64),
        "one-pixel shift left": np.roll(imgs, -1, axis=2).reshape(-1, 64),
        "one-pixel shift down": np.roll(imgs, 1, axis=1).reshape(-1, 64),
        "one-pixel shift up": np.roll(imgs, -1, axis=1).reshape(-1, 64),
        "small noise (sigma=0.3, clipped)": np.clip(X_te + rng.normal(0, 0.3, X_te.shape), 0, 16),
        "noise (sigma=1, clipped)": np.clip(X_te + rng.normal(0, 1.0, X_te.shape), 0, 16),
        "shift left + small noise": np.clip(np.roll(imgs, -1, axis=2).reshape(-1, 64)
                                            + rng.normal(0, 0.3, X_te.shape), 0, 16),
        "two-pixel shift left (not benign)": np.roll(imgs, -2, axis=2).reshape(-1, 64),
        "uniform noise [0,16] (far out)": rng.uniform(0, 16, size=X_te.shape),
        "inverted 16 - x (far out)": 16.0 - X_te,
        "uniform [0,16] x 50 (far out)": rng.uniform(0, 16, size=X_te.shape) * 50,
    }
    return [threshold_row(profile, X, label, rules) for label, X in cases.items()]


def benign_tabular(profile: Profile, X_tr: np.ndarray, X_te: np.ndarray, seed: int,
                   rules: list[tuple[str, str, float, str]]) -> list[str]:
    """Held-out rows, small measurement noise and rounding; far-out rows below."""
    rng = np.random.default_rng(seed + 2)
    std = X_tr.std(axis=0)
    low, high = X_tr.min(axis=0), X_tr.max(axis=0)
    span = high - low
    rounded = np.vectorize(lambda v: float(f"{v:.2g}"))(X_te)
    cases = {
        "held-out rows (in-distribution)": X_te,
        "noise 0.1 std": X_te + rng.normal(0, 0.1, X_te.shape) * std,
        "noise 0.2 std": X_te + rng.normal(0, 0.2, X_te.shape) * std,
        "rounded to 2 significant digits": rounded,
        "uniform over 1.5x ranges (far out)": rng.uniform(low - span / 2, high + span / 2, size=X_te.shape),
        "feature 0 unit error x10 (far out)": np.where(np.arange(X_te.shape[1]) == 0, X_te * 10, X_te),
    }
    return [threshold_row(profile, X, label, rules) for label, X in cases.items()]


def report_row(profile: Profile, X_in: np.ndarray, X_out: np.ndarray, label: str) -> list[str]:
    """One table line per scenario: AUROC / TPR@1% for every score."""
    raw_in, raw_out = profile.raw_scores(X_in), profile.raw_scores(X_out)
    cal_in, cal_out = profile.score(X_in), profile.score(X_out)
    y = np.r_[np.zeros(len(X_in)), np.ones(len(X_out))]
    cells = []
    for name in NAMES:
        auroc = roc_auc_score(y, np.r_[raw_in[name], raw_out[name]])
        tpr = float(np.mean(cal_out[name] > 0.99))
        cells.append(f"{auroc:5.3f}/{tpr:4.2f}")
    fpr = float(np.mean(cal_in[COMBINED] > 0.99))
    return [f"{label:<34} {len(X_out):>5} " + " ".join(f"{c:>12}" for c in cells) + f" {fpr:>6.3f}"]


def header(title: str) -> list[str]:
    cols = " ".join(f"{SHORT[n]:>12}" for n in NAMES)
    line = f"{'scenario (AUROC/TPR@1%FPR)':<34} {'n':>5} {cols} {'FPR':>6}"
    return [f"\n== {title}", line, "-" * len(line)]


def digits_ood(profile: Profile, X_te: np.ndarray, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    n = len(X_te)
    mean, std = X_te.mean(axis=0), X_te.std(axis=0) + 1e-9
    imgs = X_te.reshape(-1, 8, 8)
    cases = {
        "gaussian noise (feature mean/std)": np.clip(rng.normal(mean, std, size=(n, 64)), 0, 16),
        "uniform noise [0,16]": rng.uniform(0, 16, size=(n, 64)),
        "inverted (16 - x)": 16.0 - X_te,
        "rotated 90 degrees": np.rot90(imgs, 1, axes=(1, 2)).reshape(n, 64),
        "rotated 180 degrees": np.rot90(imgs, 2, axes=(1, 2)).reshape(n, 64),
        "mild noise (sigma=2, clipped)": np.clip(X_te + rng.normal(0, 2, size=X_te.shape), 0, 16),
    }
    lines: list[str] = []
    for label, X_out in cases.items():
        lines += report_row(profile, X_te, X_out, label)
    return lines


def art_attacks(
    profile: Profile, clf: LogisticRegression, X_te: np.ndarray, y_te: np.ndarray, quick: bool
) -> tuple[list[str], list[str]]:
    """White-box FGSM/PGD and black-box HopSkipJump/Boundary against the LogisticRegression."""
    from art.attacks.evasion import BoundaryAttack, FastGradientMethod, HopSkipJump, ProjectedGradientDescent
    from art.estimators.classification import BlackBoxClassifier, SklearnClassifier

    white = SklearnClassifier(model=clf, clip_values=(0.0, 16.0))
    black = BlackBoxClassifier(
        lambda x: np.eye(10)[clf.predict(x.reshape(len(x), -1))],
        input_shape=(64,),
        nb_classes=10,
        clip_values=(0.0, 16.0),
    )
    correct = clf.predict(X_te) == y_te
    X_ok, y_ok = X_te[correct], y_te[correct]
    n_black = 20 if quick else 40
    attacks: list[tuple[str, Callable[[np.ndarray], np.ndarray], int]] = [
        ("FGSM eps=1 (white box)", FastGradientMethod(white, eps=1.0).generate, len(X_ok)),
        ("FGSM eps=3 (white box)", FastGradientMethod(white, eps=3.0).generate, len(X_ok)),
        (
            "PGD eps=2 (white box)",
            ProjectedGradientDescent(white, eps=2.0, eps_step=0.25, max_iter=40, verbose=False).generate,
            len(X_ok),
        ),
        (
            "HopSkipJump (black box)",
            HopSkipJump(black, max_iter=10 if quick else 20, max_eval=500, init_eval=50, verbose=False).generate,
            n_black,
        ),
        (
            "Boundary (black box)",
            BoundaryAttack(
                black, targeted=False, max_iter=200 if quick else 500, delta=0.05, epsilon=0.05, verbose=False
            ).generate,
            n_black,
        ),
    ]
    lines: list[str] = []
    notes: list[str] = []
    for label, generate, n in attacks:
        start = time.perf_counter()
        X_src = X_ok[:n]
        X_adv = np.asarray(generate(X_src.astype(np.float32)), dtype=np.float64)
        success = clf.predict(X_adv) != y_ok[:n]
        pert = np.abs(X_adv - X_src).max(axis=1)
        median_pert = float(np.median(pert[success])) if success.any() else 0.0
        notes.append(
            f"{label}: success {success.mean():.0%} of {n}, median L_inf {median_pert:.2f} (of 16), "
            f"{time.perf_counter() - start:.1f}s"
        )
        if success.sum() >= 5:
            lines += report_row(profile, X_te, X_adv[success], label)
    return lines, notes


def tabular(seed: int, rules: list[tuple[str, str, float, str]]) -> list[str]:
    data = load_breast_cancer()
    X_tr, X_te = train_test_split(data.data, test_size=0.3, random_state=seed, stratify=data.target)
    profile = fit_profile(X_tr, fpr=0.01, seed=seed)
    rng = np.random.default_rng(seed)
    std = X_tr.std(axis=0)
    n, d = X_te.shape
    shifted = X_te.copy()
    cols = rng.choice(d, size=3, replace=False)
    shifted[:, cols] += 3 * std[cols]
    one_shift = X_te.copy()
    one_shift[np.arange(n), rng.integers(0, d, size=n)] += 5 * std[rng.integers(0, d, size=n)]
    unit_error = X_te.copy()
    unit_error[:, 0] *= 10  # radius reported in mm instead of cm
    cases = {
        "3 features shifted +3 std": shifted,
        "1 random feature +5 std": one_shift,
        "gaussian noise 0.5 std": X_te + rng.normal(0, 0.5, size=X_te.shape) * std,
        "gaussian noise 0.2 std": X_te + rng.normal(0, 0.2, size=X_te.shape) * std,
        "feature 0 unit error (x10)": unit_error,
    }
    lines = header(f"breast_cancer (30 features): fit on {len(X_tr)} rows, in-distribution = {n} test rows")
    for label, X_out in cases.items():
        lines += report_row(profile, X_te, X_out, label)
    lines += threshold_header("benign perturbations, breast_cancer: default policy's stateless rules", rules)
    lines += benign_tabular(profile, X_tr, X_te, seed, rules)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer black-box queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=args.seed, stratify=y)
    out: list[str] = []

    held = 9
    prof_held = fit_profile(X_tr[y_tr != held], labels=y_tr[y_tr != held], fpr=0.01, seed=args.seed)
    out += header(f"digits, held-out class {held}: fit on classes 0-8 ({(y_tr != held).sum()} rows)")
    out += report_row(prof_held, X_te[y_te != held], X[y == held], f"unseen digit class {held}")
    prof_held_nolab = fit_profile(X_tr[y_tr != held], fpr=0.01, seed=args.seed)
    out += report_row(prof_held_nolab, X_te[y_te != held], X[y == held], f"unseen digit {held} (no labels)")

    profile = fit_profile(X_tr, labels=y_tr, fpr=0.01, seed=args.seed)
    out += header(f"digits: fit on {len(X_tr)} training rows (with labels), in-distribution = {len(X_te)} test rows")
    out += digits_ood(profile, X_te, args.seed)
    rules = policy_thresholds()
    out += threshold_header("benign perturbations, digits: default policy's stateless rules", rules)
    out += benign_digits(profile, X_te, args.seed, rules)

    clf = LogisticRegression(max_iter=2000).fit(X_tr, y_tr)
    adv_lines, notes = art_attacks(profile, clf, X_te, y_te, args.quick)
    out += header(f"digits adversarial (ART) vs LogisticRegression, test accuracy {clf.score(X_te, y_te):.3f}")
    out += adv_lines
    out += tabular(args.seed, rules)
    print("\n".join(out))
    print("\nattacks:")
    print("\n".join(f"  {n}" for n in notes))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
