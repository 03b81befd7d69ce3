"""Benign traffic shapes for the detection matrix, and their replay through the in-process guard.

Every shape draws from the held-out split only (rows the profile never saw). One rule for every model:
edits are sized in units of the feature's spread in the reference (integer inputs change by one level),
and times are simulated (sessions overlap, about ``concurrency`` at once, sharing the global index).

- ``fresh``: held-out rows in random order (repeating once the split is used up), about 1 s apart;
- ``popular``: ten popular held-out records shared by every client, each query one of them, half the time
  with a small edit (one to three features moved by up to 10 % of their spread, or one level);
- ``retry``: fresh rows where a fifth of the queries retry the last one exactly and a fifth edit it slightly;
- ``batch``: requests of 64 held-out rows;
- ``burst``: fresh rows sent 5 ms apart (within the default rate limit's burst);
- ``drift``: fresh rows plus a shift growing linearly to half a spread along one direction per session.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from _matrix_guard import InProcessGuard

__all__ = ["SHAPES", "Session", "make_sessions", "replay"]

SHAPES = ("fresh", "popular", "retry", "batch", "burst", "drift")
ALERTS = frozenset({"flag", "harden", "throttle", "block"})


@dataclass
class Session:
    """One benign client: its requests (row blocks) and their times."""

    shape: str
    key: str
    times: np.ndarray
    requests: list[np.ndarray]


class _Edits:
    """Small edits in units of each feature's spread in the reference (one level for integer inputs)."""

    def __init__(self, X_ref: np.ndarray, integer: bool) -> None:
        self.spread = X_ref.std(axis=0)
        self.lo, self.hi = X_ref.min(axis=0), X_ref.max(axis=0)
        self.integer = integer

    def edit(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = row.copy()
        live = np.flatnonzero(self.spread > 0)
        cols = rng.choice(live, size=min(len(live), int(rng.integers(1, 4))), replace=False)
        if self.integer:
            out[cols] += rng.choice([-1.0, 1.0], size=len(cols))
        else:
            out[cols] += rng.uniform(-0.1, 0.1, size=len(cols)) * self.spread[cols]
        return np.clip(out, self.lo, self.hi)


def _fresh_rows(X: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    order = np.concatenate([rng.permutation(len(X)) for _ in range(n // len(X) + 1)])[:n]
    return X[order]


def _session(shape: str, X: np.ndarray, edits: _Edits, popular: np.ndarray, rng: np.random.Generator,
             key: str) -> Session:
    gaps = None
    if shape == "batch":
        n = int(rng.integers(2, 9))
        reqs = [_fresh_rows(X, rng, 64) for _ in range(n)]
    elif shape == "popular":
        n = int(rng.integers(10, 61))
        weights = 1.0 / np.arange(1, len(popular) + 1)
        picks = rng.choice(len(popular), size=n, p=weights / weights.sum())
        reqs = [(edits.edit(popular[p], rng) if rng.random() < 0.5 else popular[p].copy())[None] for p in picks]
    elif shape == "retry":
        n = int(rng.integers(20, 101))
        fresh = _fresh_rows(X, rng, n)
        reqs = []
        for i in range(n):
            u = rng.random()
            if reqs and u < 0.2:
                reqs.append(reqs[-1].copy())
            elif reqs and u < 0.4:
                reqs.append(edits.edit(reqs[-1][0], rng)[None])
            else:
                reqs.append(fresh[i][None])
    elif shape == "drift":
        n = int(rng.integers(50, 151))
        direction = rng.normal(size=X.shape[1])
        direction /= np.linalg.norm(direction)
        step = 0.5 * edits.spread * direction * np.sqrt(X.shape[1])
        rows = _fresh_rows(X, rng, n) + np.outer(np.linspace(0.0, 1.0, n), step)
        if edits.integer:
            rows = np.round(rows)
        reqs = [r[None] for r in np.clip(rows, edits.lo, edits.hi)]
    else:  # fresh, burst
        n = int(rng.integers(20, 151)) if shape == "fresh" else int(rng.integers(30, 91))
        reqs = [r[None] for r in _fresh_rows(X, rng, n)]
        if shape == "burst":
            gaps = np.full(n, 0.005)
    if gaps is None:
        gaps = rng.exponential(1.0, size=len(reqs))
    return Session(shape, key, np.cumsum(gaps), reqs)


def make_sessions(X: np.ndarray, X_ref: np.ndarray, integer: bool, per_shape: int, seed: int,
                  concurrency: int = 32) -> list[Session]:
    """``per_shape`` sessions of every shape, start times spread so that about ``concurrency`` overlap."""
    rng = np.random.default_rng(seed)
    edits = _Edits(X_ref, integer)
    popular = X[rng.choice(len(X), size=min(10, len(X)), replace=False)]
    sessions = []
    for shape in SHAPES:
        for i in range(per_shape):
            sessions.append(_session(shape, X, edits, popular, np.random.default_rng([seed, len(sessions)]),
                                     f"benign-{shape}-{i}"))
    mean_duration = float(np.mean([s.times[-1] for s in sessions]))
    horizon = mean_duration * len(sessions) / concurrency
    order = rng.permutation(len(sessions))
    for rank, s in zip(order, sessions, strict=True):
        s.times = s.times + horizon * rank / len(sessions)
    return sessions


def _events(sessions: list[Session]) -> Iterator[tuple[float, int, int]]:
    heap = [(float(s.times[0]), i, 0) for i, s in enumerate(sessions)]
    heapq.heapify(heap)
    while heap:
        t, i, j = heapq.heappop(heap)
        yield t, i, j
        if j + 1 < len(sessions[i].requests):
            heapq.heappush(heap, (float(sessions[i].times[j + 1]), i, j + 1))


@dataclass
class SessionResult:
    """The worst a benign session met: alerted (any flag/harden/throttle/block), blocked (a 403), by which rules."""

    shape: str
    alerted: bool = False
    blocked: bool = False
    rules: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()


def replay(guard: InProcessGuard, sessions: list[Session]) -> list[SessionResult]:
    """Send every session's requests in time order through ``guard``; the stateless scores and the model's
    answers are computed once per row up front (both are pure), the trackers and the policy run per request
    as in the live path."""
    flat = np.concatenate([r for s in sessions for r in s.requests])
    per_row = guard.row_scores(flat)
    answers = guard.predict_proba(flat)
    starts: list[list[int]] = []
    pos = 0
    for s in sessions:
        starts.append([])
        for r in s.requests:
            starts[-1].append(pos)
            pos += r.shape[0]
    results = [SessionResult(s.shape) for s in sessions]
    for t, i, j in _events(sessions):
        rows = sessions[i].requests[j]
        a = starts[i][j]
        scores = {k: v[a : a + rows.shape[0]] for k, v in per_row.items()}
        out = guard.ask(sessions[i].key, rows, t, scores, answers[a : a + rows.shape[0]])
        res = results[i]
        if out.action in ALERTS:
            res.alerted = True
            res.blocked = res.blocked or out.status == 403
            if out.rule not in res.rules:
                res.rules = (*res.rules, out.rule)
            high = (k for k, v in out.scores.items() if v >= 0.5 and k.startswith("session.") and k != "session.risk")
            res.signals = tuple(sorted({*res.signals, *high}))
    return results
