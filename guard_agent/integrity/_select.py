"""Which reference rows become canaries: a random sample, class prototypes, points near the boundary.

Pure numpy. Sampled rows catch a wholesale swap; prototypes (the row nearest each predicted class's
centroid) catch a class whose meaning changed; rows with the smallest top-2 probability margin catch a
model that was nudged, which moves the boundary first. Rows whose margin is below ``min_margin`` are never
chosen: their label could flip on floating-point noise alone (another BLAS, another CPU), a false alarm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Selection", "select_canaries", "top2_margin"]


@dataclass(frozen=True)
class Selection:
    """Chosen row indices into the pool, and the reason each was chosen."""

    indices: np.ndarray
    kinds: tuple[str, ...]


def top2_margin(probabilities: np.ndarray) -> np.ndarray:
    """Highest minus second-highest probability per row."""
    part = np.sort(probabilities, axis=1)
    return np.asarray(part[:, -1] - part[:, -2], dtype=np.float64)


def select_canaries(X: np.ndarray, labels: np.ndarray | None, probabilities: np.ndarray | None, *,
                    count: int, rng: np.random.Generator, min_margin: float = 2e-3) -> Selection:
    """Up to ``count`` distinct rows: prototypes (<= a third), boundary rows (<= a quarter), the rest sampled."""
    if count < 1:
        raise ValueError("count must be at least 1")
    n = X.shape[0]
    usable = np.ones(n, dtype=bool)
    margin: np.ndarray | None = None
    if probabilities is not None:
        margin = top2_margin(probabilities)
        usable &= margin >= min_margin
    if labels is None and probabilities is not None:
        labels = np.argmax(probabilities, axis=1)
    chosen: list[int] = []
    kinds: list[str] = []
    taken = np.zeros(n, dtype=bool)

    def take(index: int, kind: str) -> None:
        chosen.append(int(index))
        kinds.append(kind)
        taken[index] = True

    if labels is not None:
        classes, sizes = np.unique(labels[usable], return_counts=True)
        for c in classes[np.argsort(-sizes, kind="stable")][: max(1, count // 3)]:
            rows = np.flatnonzero(usable & (labels == c))
            centroid = X[rows].mean(axis=0)
            take(rows[int(np.argmin(np.linalg.norm(X[rows] - centroid, axis=1)))], "prototype")
    if margin is not None:
        order = np.argsort(margin, kind="stable")
        for index in order[usable[order] & ~taken[order]][: count // 4]:
            take(int(index), "boundary")
    rest = np.flatnonzero(usable & ~taken)
    room = max(0, count - len(chosen))
    for index in rng.choice(rest, size=min(room, rest.size), replace=False) if rest.size else ():
        take(int(index), "sample")
    order_out = np.argsort(np.asarray(chosen), kind="stable")
    return Selection(indices=np.asarray(chosen, dtype=np.int64)[order_out],
                     kinds=tuple(kinds[i] for i in order_out))
