"""The detection matrix's attacks: ``guard_agent.attacks`` (real ART code) through ``MatrixClient``.

Evasion goal: an adversarial example within 1.5x the L2 distance the same attack reaches against the bare
model with the same budget (as ``bench/attacks.py``). An evasion run attacks the first of its candidate rows
from which the attack reaches an adversarial example against the bare model: HopSkipJump and Boundary start
from uniform noise, and where all noise gets one class (``cancer-svc``'s class 0) an attack on a row of that
class never starts, so it would measure nothing. Extraction: a thief trained on the answered queries,
its agreement with the victim on the held-out split (fidelity), with and without the guard; success =
agreement >= 0.8 with the guard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from _matrix_guard import InProcessGuard, MatrixClient
from _matrix_models import MatrixModel

from guard_agent.attacks import AttackBlocked, black_box_evasion, extraction_attack
from guard_agent.attacks._art import black_box_classifier

__all__ = ["ATTACKS", "AttackRun", "run_attack"]

# name -> (kind, keys, target queries to the first block)
ATTACKS: dict[str, tuple[str, int, int]] = {
    "hsj": ("evasion", 1, 25),
    "boundary": ("evasion", 1, 25),
    "hsj-natural-start": ("evasion", 1, 50),
    "hsj-persistent": ("evasion", 1, 25),  # a new key, from a new address, after every 403
    "hsj-persistent-one-address": ("evasion", 1, 25),  # a new key after every 403, all from one address
    "hsj-jitter": ("evasion", 1, 25),
    "hsj-10-keys": ("evasion", 10, 25),
    "hsj-50-keys": ("evasion", 50, 25),
    "uniform": ("extraction", 1, 100),
    "jbda": ("extraction", 1, 100),
    "natural": ("extraction", 1, 0),  # natural-data extraction: no block target, agreement is what counts
}
GOAL_FIDELITY = 0.8
NATURAL_QUERIES = 2000
"""The natural-data thief crawls this many rows at least: a dataset's worth, twice ``session.crawl``'s volume
(0.5 at 1,000 distinct rows), so the matrix shows where the crawl is hardened and what the copy keeps."""


@dataclass(frozen=True)
class AttackRun:
    """One attack run: queries sent, first alert and block (query number), stopped, success, agreement."""

    attack: str
    row: int  # the held-out row attacked (evasion) or the run's seed row (extraction)
    sent: int
    first_alert: int | None
    first_block: int | None
    stopped: bool
    success: bool
    fidelity: float | None = None
    fidelity_unguarded: float | None = None
    hardened: int = 0


def _client(model: MatrixModel, guard: InProcessGuard | None, run_id: str, keys: int, **kw: Any) -> MatrixClient:
    return MatrixClient(url="", keys=[f"k{i}" for i in range(keys)], run_id=run_id, model="m", guard=guard,
                        direct=model.predict_proba, **kw)


class _JitterClient(MatrixClient):
    """Adds fresh noise (1 % of the attack box) to every query, to dodge near-duplicate matching."""

    def predict(self, X: np.ndarray) -> Any:
        X = np.asarray(X, dtype=np.float64).reshape(np.asarray(X).shape[0], -1)
        lo, hi = self.box
        rng = np.random.default_rng(self.sent)
        return super().predict(np.clip(X + rng.normal(0.0, 0.01, X.shape) * (hi - lo), lo, hi))

    box: tuple[np.ndarray, np.ndarray] = (np.zeros(1), np.ones(1))


def _hsj_from(client: MatrixClient, model: MatrixModel, x0: np.ndarray, start: np.ndarray, goal: float,
              seed: int, budget: int) -> tuple[bool, float]:
    """HopSkipJump started from a real sample of another class; (stopped, best L2 answered)."""
    from art.attacks.evasion import HopSkipJump

    y0 = int(np.argmax(model.predict_proba(x0[None])[0]))
    best = math.inf

    def predict(x: np.ndarray) -> np.ndarray:
        nonlocal best
        rows = np.asarray(x, dtype=np.float64).reshape(np.asarray(x).shape[0], -1)
        labels = client.predict(rows).labels
        labels = np.where(labels < 0, y0, labels)
        adv = labels != y0
        if adv.any():
            best = min(best, float(np.min(np.linalg.norm(rows[adv] - x0, axis=1))))
        onehot: np.ndarray = np.eye(model.n_classes)[labels]
        return onehot

    clf = black_box_classifier(predict, x0.size, model.n_classes, (model.clip[0], model.clip[1]))
    np.random.seed(seed)  # ART draws from numpy's global generator
    attack = HopSkipJump(clf, targeted=False, max_iter=max(1, budget // 200), max_eval=200, init_eval=50,
                         verbose=False)
    try:
        attack.generate(x0[None].astype(np.float32), x_adv_init=start[None].astype(np.float32))
    except AttackBlocked:
        return True, best
    return False, best


def _evasion(model: MatrixModel, guard: InProcessGuard | None, name: str, i: int, goal: float,
             budget: int) -> tuple[MatrixClient, bool, float]:
    x0 = model.X_test[i]
    run_id = f"{name}-{i}-{'g' if guard else 'u'}"
    keys = ATTACKS[name][1]
    if name == "hsj-jitter":
        client: MatrixClient = _JitterClient(url="", keys=["k0"], run_id=run_id, model="m", guard=guard,
                                             direct=model.predict_proba)
        client.box = model.clip  # type: ignore[attr-defined]
    else:
        persistent = name.startswith("hsj-persistent")
        client = _client(model, guard, run_id, keys, new_key_after_block=persistent,
                         refusals_to_retire=10**9 if persistent else 3,
                         one_address=name == "hsj-persistent-one-address")
    if name == "hsj-natural-start":
        y0 = int(np.argmax(model.predict_proba(x0[None])[0]))
        others = np.flatnonzero(model.clf.predict(model.X_test) != y0)
        start = model.X_test[others[i % len(others)]]
        stopped, best = _hsj_from(client, model, x0, start, goal, i, budget)
    else:
        method = "boundary" if name == "boundary" else "hsj"
        res = black_box_evasion(client, x0, method=method, goal_l2=goal, n_classes=model.n_classes,
                                clip=(model.clip[0], model.clip[1]), seed=i, budget=budget)  # type: ignore[arg-type]
        stopped, best = res.stopped, res.detail["best_l2"]
    return client, stopped, best


def _extraction(model: MatrixModel, guard: InProcessGuard | None, name: str, i: int,
                queries: int) -> tuple[MatrixClient, bool, float]:
    rng = np.random.default_rng(7000 + i)
    pool: np.ndarray | None
    if name == "jbda":
        pool = model.X_test[rng.choice(len(model.X_test), 10, replace=False)]
    elif name == "natural":  # the model's own distribution: held-out rows with small noise, shuffled
        queries = max(queries, NATURAL_QUERIES)
        base = model.X_test[rng.integers(len(model.X_test), size=queries)]
        noisy = base + rng.normal(0.0, 0.05, base.shape) * model.X_train.std(axis=0)
        pool = np.round(noisy) if model.integer else noisy
        pool = np.clip(pool, model.clip[0], model.clip[1])
    else:
        pool = None
    client = _client(model, guard, f"{name}-{i}-{'g' if guard else 'u'}", 1)
    y_victim = model.clf.predict(model.X_test)
    res = extraction_attack(client, name, n_queries=queries, pool=pool, X_eval=model.X_test,  # type: ignore[arg-type]
                            y_victim=y_victim, goal_fidelity=GOAL_FIDELITY, n_classes=model.n_classes,
                            clip=(model.clip[0], model.clip[1]), seed=7000 + i)  # type: ignore[arg-type]
    return client, res.stopped, res.detail["fidelity"]


MAX_CANDIDATES = 30
"""Rows an evasion run tries against the bare model before it attacks the last one anyway (and cannot succeed)."""


def _attackable(model: MatrixModel, name: str, candidates: Sequence[int], budget: int) -> tuple[int, float]:
    """The first candidate row from which the attack reaches an adversarial example against the bare model, and
    the L2 distance it reaches there (inf when none of the first ``MAX_CANDIDATES`` does)."""
    best = math.inf
    for i in candidates[:MAX_CANDIDATES]:
        _, _, best = _evasion(model, None, name, i, 0.0, budget)
        if math.isfinite(best):
            return i, best
    return candidates[min(len(candidates), MAX_CANDIDATES) - 1], best


def run_attack(model: MatrixModel, make_guard: Any, name: str, candidates: Sequence[int], *, budget: int,
               queries: int) -> AttackRun:
    """One run of ``name`` against a fresh guard from ``make_guard()`` and, for the baseline, the bare model.
    Evasion attacks the first of the held-out ``candidates`` rows the bare-model attack succeeds from;
    extraction is seeded with ``candidates[0]``."""
    kind = ATTACKS[name][0]
    guard = make_guard()
    try:
        if kind == "evasion":
            i, unguarded = _attackable(model, name, candidates, budget)
            goal = 1.5 * unguarded
            client, stopped, best = _evasion(model, guard, name, i, goal, budget)
            return AttackRun(name, i, client.sent, client.first_alert, client.first_block, stopped,
                             math.isfinite(best) and best <= goal, hardened=client.actions.get("harden", 0))
        i = candidates[0]
        _, _, fid_u = _extraction(model, None, name, i, queries)
        client, stopped, fid = _extraction(model, guard, name, i, queries)
        return AttackRun(name, i, client.sent, client.first_alert, client.first_block, stopped,
                         fid >= GOAL_FIDELITY, fid, fid_u, hardened=client.actions.get("harden", 0))
    finally:
        guard.close()
