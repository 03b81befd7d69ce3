"""Per-request cost of each detector and the accuracy each speed shortcut costs (not a test).

Run: /work/venv/bin/python bench/detector_cost.py

Target: Profile.score of one 64-feature row with a 5,000-row reference set <= 150 us for the default
set. Shortcuts measured here: float32 scoring, the k-means cell (IVF) kNN index instead of exact search, and
the array traversal of the Isolation Forest instead of sklearn's score_samples.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from detectors import COMBINED, IsolationForestDetector, KNNDistance, fit_profile
from detectors._validation import as_rows32
from detectors.iforest import flatten_forest

D, N_REF, LATENT, CLUSTERS = 64, 5000, 12, 10


def synthetic(seed: int = 0) -> tuple[np.ndarray, Callable[[int, int], np.ndarray], np.ndarray]:
    """A 10-cluster mixture on a 12-dim linear manifold in 64 dims plus small noise (a realistic embedding)."""
    rng = np.random.default_rng(seed)
    lift = rng.normal(size=(LATENT, D)) / np.sqrt(LATENT)
    centers = rng.normal(size=(CLUSTERS, LATENT)) * 2

    def sample(n: int, s: int) -> np.ndarray:
        r = np.random.default_rng(s)
        z = centers[r.integers(0, CLUSTERS, size=n)] + r.normal(size=(n, LATENT))
        return z @ lift + 0.1 * r.normal(size=(n, D))

    new_center = rng.normal(size=LATENT) * 2
    return sample(N_REF, 1), sample, new_center @ lift


def per_call_us(fn: Callable[[np.ndarray], object], rows: np.ndarray, repeats: int = 3) -> float:
    """Median wall time of single-row calls, cycling through different rows (no cache-friendly repeats)."""
    for r in rows[:50]:
        fn(r[None])
    samples = []
    for _ in range(repeats):
        for r in rows:
            x = r[None]
            start = time.perf_counter()
            fn(x)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]))


def main() -> None:
    X, sample, new_center = synthetic()
    t0 = time.perf_counter()
    profile = fit_profile(X, seed=0)
    fit_s = time.perf_counter() - t0
    rows = sample(500, 7)
    rows32 = as_rows32(rows, n_features=D)
    knn_params = profile.document["detectors"]["ood.knn"]["params"]
    print(
        f"reference {N_REF} x {D} (fit {profile.document['rows']['fit']}, calibration "
        f"{profile.document['rows']['calibration']}); fit_profile {fit_s:.1f}s; kNN index "
        f"{knn_params['index_kind']} ({knn_params['n_cells']} cells, probe {knn_params['n_probe_used']})"
    )
    print(f"\n{'detector':<18} {'raw score us/row':>17} {'+ p-value us/row':>17}")
    print("-" * 54)
    for name, det in profile.detectors.items():
        raw = per_call_us(lambda x, det=det: det._score(as_rows32(x, n_features=D)), rows)
        with_p = per_call_us(lambda x, det=det: det.p_values(det._score(as_rows32(x, n_features=D))), rows)
        print(f"{name:<18} {raw:>17.1f} {with_p:>17.1f}")
    total = per_call_us(profile.score, rows)
    print(f"{'Profile.score':<18} {total:>17.1f}   (validation + 5 detectors + {COMBINED}; target <= 150)")

    # -- kNN: exact vs IVF ------------------------------------------------------------------------------
    ref_fit = X[: profile.document["rows"]["fit"]]
    in_test = sample(2000, 11)
    off_manifold = in_test + 0.35 * np.random.default_rng(12).normal(size=in_test.shape)
    new_cluster = new_center + np.random.default_rng(13).normal(size=(2000, LATENT)) @ (
        np.random.default_rng(0).normal(size=(LATENT, D)) / np.sqrt(LATENT)
    )
    exact = KNNDistance(index="exact").fit(ref_fit)
    ivf = KNNDistance(index="ivf").fit(ref_fit)
    print("\nkNN shortcut: exact brute force vs k-means cell index (same reference rows)")
    print(f"{'':<22} {'us/row':>8} {'AUROC off-manifold':>19} {'AUROC new cluster':>18}")
    for label, det in (("exact", exact), ("ivf (default >2048)", ivf)):
        us = per_call_us(lambda x, det=det: det._score(as_rows32(x, n_features=D)), rows)
        s_in = det.score_samples(in_test)
        print(
            f"{label:<22} {us:>8.1f} {auroc(s_in, det.score_samples(off_manifold)):>19.4f} "
            f"{auroc(s_in, det.score_samples(new_cluster)):>18.4f}"
        )
    e, a = exact.score_samples(in_test), ivf.score_samples(in_test)
    print(
        f"ivf vs exact on inliers: {np.mean(np.isclose(a, e, rtol=1e-4)):.1%} identical, "
        f"median relative excess {np.median(a / e - 1):.2%}, Spearman {spearmanr(a, e).statistic:.4f}"
    )
    digits, labels = load_digits(return_X_y=True)
    ref_d, held = digits[labels != 9][:1200], digits[labels == 9]
    test_d = digits[labels != 9][1200:]
    for label, det in (
        ("exact", KNNDistance(index="exact").fit(ref_d)),
        ("ivf (forced)", KNNDistance(index="ivf").fit(ref_d)),
    ):
        print(
            f"digits held-out class 9, {label:<13} AUROC "
            f"{auroc(det.score_samples(test_d), det.score_samples(held)):.4f}"
        )

    # -- Isolation Forest: sklearn vs arrays ---------------------------------------------------------------
    forest = IsolationForest(random_state=0).fit(ref_fit)
    arrays = IsolationForestDetector.__new__(IsolationForestDetector)
    arrays.n_features_in_ = D
    arrays._set_arrays(flatten_forest(forest), int(forest.max_samples_))
    probe = np.vstack([in_test, off_manifold])
    diff = float(np.max(np.abs(arrays.score_samples(probe) + forest.score_samples(probe))))
    sk_us = per_call_us(forest.score_samples, rows[:100], repeats=1)
    ar_us = per_call_us(lambda x: arrays._score(as_rows32(x, n_features=D)), rows)
    print(
        f"\nIsolationForest: sklearn score_samples {sk_us:.0f} us/row, array traversal {ar_us:.1f} us/row, "
        f"max |difference| {diff:.2e} over {len(probe)} rows"
    )

    # -- float32 vs float64 --------------------------------------------------------------------------------
    print("\nfloat32 scoring vs the same arithmetic in float64 (relative difference of raw scores):")
    for name in ("ood.mahalanobis", "ood.pca", "ood.knn"):
        det = profile.detectors[name]
        s32 = det._score(as_rows32(in_test, n_features=D))
        s64 = det._score(in_test.astype(np.float64))  # type: ignore[arg-type]
        rel = np.abs(s32 - s64) / np.maximum(np.abs(s64), 1e-12)
        print(f"  {name:<16} median {np.median(rel):.1e}, max {rel.max():.1e}")
    del rows32


if __name__ == "__main__":
    main()
