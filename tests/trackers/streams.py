"""Generated query streams for tracker tests: benign traffic and attack-shaped traffic.

Attack streams imitate the query geometry of the real attacks (HopSkipJump's binary search and
gradient-estimation probes, Jacobian augmentation, uniform noise, out-of-distribution natural
patches); the slow test runs the real ART attacks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from guard_agent.attacks import natural_patches

__all__ = ["benign_stream", "hsj_like", "jbda_like", "jbda_stream", "natural_patches", "uniform_stream"]


def benign_stream(
    X: np.ndarray,
    rng: np.random.Generator,
    n: int,
    *,
    p_repeat: float = 0.1,
    p_noise: float = 0.05,
    p_shift: float = 0.05,
    image_shape: tuple[int, int] | None = None,
    lo: float | np.ndarray = 0.0,
    hi: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Held-out rows in random order with exact retries, small-noise near-duplicates (noise 2 % of the
    [lo, hi] range) and 1-pixel shifts (images only)."""
    rows: list[np.ndarray] = []
    order = rng.permutation(X.shape[0])
    k = 0
    for _ in range(n):
        u = rng.random()
        if rows and u < p_repeat:
            rows.append(rows[rng.integers(len(rows))].copy())
        elif rows and u < p_repeat + p_noise:
            base = rows[rng.integers(len(rows))]
            rows.append(np.clip(base + rng.normal(size=base.shape) * 0.02 * (np.asarray(hi) - lo), lo, hi))
        elif rows and image_shape is not None and u < p_repeat + p_noise + p_shift:
            base = rows[rng.integers(len(rows))].reshape(image_shape)
            rows.append(np.roll(base, int(rng.choice([-1, 1])), axis=int(rng.integers(2))).reshape(-1))
        else:
            rows.append(X[order[k % len(order)]].astype(np.float64))
            k += 1
    return np.asarray(rows)


def hsj_like(
    x0: np.ndarray, rng: np.random.Generator, n: int, *, lo: float | np.ndarray = 0.0, hi: float | np.ndarray = 1.0,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """HopSkipJump's query geometry (as ART implements it): a random start, a binary search towards x0,
    then gradient estimation, i.e. 100 probes at L2 distance 0.1 * range around the boundary point,
    later batches at 0.01 * its distance to x0, each followed by a step. With ``predict`` (labels of rows)
    the start is a random point of another class and the search keeps the side answered with another
    class, as the real attack does, so the probes sit on the model's decision boundary."""
    start = lo + (np.asarray(hi) - lo) * rng.uniform(size=x0.shape)
    y0 = None if predict is None else int(predict(x0[None])[0])
    for _ in range(100 if predict is not None else 0):
        if int(predict(start[None])[0]) != y0:  # type: ignore[misc]
            break
        start = lo + (np.asarray(hi) - lo) * rng.uniform(size=x0.shape)
    rows = [x0.copy(), start]
    a, b = 0.0, 1.0
    while len(rows) < 14:
        mid = (a + b) / 2
        rows.append((1 - mid) * x0 + mid * start)
        adversarial = rng.random() < 0.5 if predict is None else int(predict(rows[-1][None])[0]) != y0
        a, b = (a, mid) if adversarial else (mid, b)
    boundary = (1 - b) * x0 + b * start
    span = float(np.max(np.asarray(hi) - lo))
    first = True
    while len(rows) < n:
        dist = float(np.linalg.norm(boundary - x0))
        delta = 0.1 * span if first else 0.01 * dist
        for _ in range(100 if first else 25):
            u = rng.normal(size=x0.shape)
            rows.append(np.clip(boundary + delta * u / np.linalg.norm(u), lo, hi))
        first = False
        boundary = boundary + 0.1 * (x0 - boundary) + 0.02 * dist * rng.normal(size=x0.shape) / np.sqrt(x0.size)
    return np.asarray(rows[:n])


def jbda_like(seeds: np.ndarray, rng: np.random.Generator, n: int, *, lam: float, lo: float = 0.0,
              hi: float = 1.0) -> np.ndarray:
    """Jacobian-based augmentation: each round adds x + lam * sign(gradient) for every known point
    (gradient directions of a substitute, imitated here by a fixed random linear model per class)."""
    w = rng.normal(size=(10, seeds.shape[1]))
    pts = [s.astype(np.float64) for s in seeds]
    out = list(pts)
    while len(out) < n:
        new = [np.clip(p + lam * np.sign(w[int(rng.integers(10))]), lo, hi) for p in pts]
        out.extend(new)
        pts = pts + new
    return np.asarray(out[:n])


def jbda_stream(
    seeds: np.ndarray, oracle: Callable[[np.ndarray], np.ndarray], n: int, *, lam: float, lo: float = 0.0,
    hi: float = 1.0,
) -> np.ndarray:
    """Papernot et al.'s Jacobian-based dataset augmentation with a logistic-regression substitute:
    each round labels the known points with the oracle, fits the substitute and adds
    x + lam * sign(d substitute_logit[oracle label] / dx) for every known point."""
    from sklearn.linear_model import LogisticRegression

    pts = seeds.astype(np.float64)
    out = list(pts)
    while len(out) < n:
        y = oracle(pts)
        if np.unique(y).size < 2:
            grad = np.sign(np.random.default_rng(len(out)).normal(size=pts.shape))
        else:
            sub = LogisticRegression(max_iter=200).fit(pts, y)
            idx = np.searchsorted(sub.classes_, y)
            grad = np.sign(sub.coef_[np.minimum(idx, sub.coef_.shape[0] - 1)])
        new = np.clip(pts + lam * grad, lo, hi)
        out.extend(new)
        pts = np.concatenate([pts, new])
    return np.asarray(out[:n])


def uniform_stream(d: int, rng: np.random.Generator, n: int, *, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Uniform random queries over the input box."""
    return rng.uniform(lo, hi, size=(n, d))
