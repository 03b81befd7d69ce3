"""Query-based black-box evasion with ART: HopSkipJump and BoundaryAttack through the guard."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np

from ._art import black_box_classifier
from ._client import REFUSED, AttackBlocked, GuardClient
from ._result import AttackResult

__all__ = ["black_box_evasion"]


def black_box_evasion(
    client: GuardClient,
    x0: np.ndarray,
    *,
    method: Literal["hsj", "boundary"],
    goal_l2: float,
    n_classes: int,
    clip: tuple[float, float],
    seed: int = 0,
    budget: int = 1000,
) -> AttackResult:
    """Search an adversarial example for ``x0`` using labels only; success when one at L2 distance
    <= ``goal_l2`` was answered before the guard stopped the attack, never when none was answered (an infinite
    goal, from a baseline that found nothing, does not make a failed attack succeed). ``budget`` bounds the
    attack's iterations (roughly its query count when unguarded)."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump

    x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
    best = math.inf
    goal_at: int | None = None  # queries sent when the goal was first reached
    try:
        y0 = int(client.predict(x0[None, :]).labels[0])
    except AttackBlocked:
        return _result(client, method, True, math.inf, goal_l2)
    if y0 == REFUSED:
        return _result(client, method, False, math.inf, goal_l2)

    def predict(x: np.ndarray) -> np.ndarray:
        nonlocal best, goal_at
        rows = np.asarray(x, dtype=np.float64).reshape(np.asarray(x).shape[0], -1)
        labels = client.predict(rows).labels
        labels = np.where(labels == REFUSED, y0, labels)  # a refused answer tells the attack nothing new
        adv = labels != y0
        if adv.any():
            best = min(best, float(np.min(np.linalg.norm(rows[adv] - x0, axis=1))))
            if goal_at is None and best <= goal_l2:
                goal_at = client.sent
        onehot: np.ndarray = np.eye(n_classes)[np.clip(labels, 0, n_classes - 1)]
        return onehot

    clf = black_box_classifier(predict, x0.size, n_classes, clip)
    np.random.seed(seed)  # ART draws from numpy's global generator
    if method == "hsj":
        attack = HopSkipJump(clf, targeted=False, max_iter=max(1, budget // 200), max_eval=200, init_eval=50,
                             verbose=False)
    else:
        attack = BoundaryAttack(clf, targeted=False, max_iter=max(1, budget // 20), num_trial=10, sample_size=10,
                                init_size=100, verbose=False)
    stopped = False
    try:
        start = _starting_point(predict, x0, y0, np.random.RandomState(seed), clip, search=method == "hsj")
        if start is not None:
            attack.generate(x0[None, :].astype(np.float32), x_adv_init=start[None, :].astype(np.float32))
    except AttackBlocked:
        stopped = True
    return _result(client, method, stopped, best, goal_l2, goal_at)


INIT_DRAWS = 100
"""Uniform draws the attacks try for a starting point (ART's ``init_size``)."""


def _starting_point(predict: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, y0: int, rng: np.random.RandomState,
                    clip: tuple[float, float] | tuple[np.ndarray, np.ndarray], *, search: bool) -> np.ndarray | None:
    """The attack's start as ART finds it, from a seeded generator: ART draws its uniform noise from an unseeded
    ``np.random.RandomState()``, so two runs of one seed sent different queries. Noise in the box until one is
    answered with another class than ``x0``'s (at most ``INIT_DRAWS``; None: the attack cannot start), then, for
    HopSkipJump, ART's binary search towards ``x0`` (L2, threshold 0.001 on the interpolation weight)."""
    lo, hi = (np.broadcast_to(np.asarray(c, dtype=np.float64), x0.shape) for c in clip)
    for _ in range(INIT_DRAWS):
        noise = rng.uniform(lo, hi, size=x0.shape)
        if int(np.argmax(predict(noise[None, :])[0])) != y0:
            break
    else:
        return None
    if not search:
        return noise
    lower, upper = 0.0, 1.0
    while upper - lower > 0.001:
        alpha = (upper + lower) / 2.0
        if int(np.argmax(predict(((1.0 - alpha) * x0 + alpha * noise)[None, :])[0])) != y0:
            upper = alpha
        else:
            lower = alpha
    return (1.0 - upper) * x0 + upper * noise


def _result(client: GuardClient, method: str, stopped: bool, best: float, goal: float,
            goal_at: int | None = None) -> AttackResult:
    detail = {"best_l2": best, "goal_l2": goal}
    if goal_at is not None:
        detail["goal_at"] = float(goal_at)
    return AttackResult(
        name=method, run_id=client.run_id, keys=len(client.keys), sent=client.sent, answered=client.answered,
        stopped=stopped, success=math.isfinite(best) and best <= goal, detail=detail,
    )
