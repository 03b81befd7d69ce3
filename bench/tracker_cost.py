"""Per-request CPU of the session trackers on the guard's hot path (not a test).

What runs per request with the default policy: ``SessionTracking.peek`` (the session's decayed scores,
fingerprints, exact-input keys, reference density, the global index's ``observe``) and, after the model
answered, ``SessionTracking.update`` (the trackers learn the query). Measured here on a tracker config fitted
on digits (64 features), probabilities from a LogisticRegression, 64 sessions warmed with 40 queries each and
a global index warmed to ``--entries`` stored fingerprints (default 20,000), for 1-row and 64-row requests.

Lines: ``total`` is ``SessionTracking.peek`` + ``update`` as the proxy calls them; the other lines time the
same steps one by one: ``peek scores`` (``SessionTrackers.peek``), ``hashes`` (fingerprints and exact-row
keys), ``density`` (``reference_density`` of every row; ``peek`` computes it only for rows that have
near-duplicates, so the sum of the parts exceeds the total by about this line), ``global observe``
(``GlobalFingerprintIndex.observe``), ``update`` (``SessionTrackers.update`` with the hashes passed in) and
``global learn`` (``GlobalFingerprintIndex.learn``: the answers filed with the index's entries).
``K at once``: K one-row requests of distinct sessions sent together (``asyncio.gather``), total time per
request: concurrent requests share the per-turn batched calls (hashes, ``SessionTrackers.update_many``), so
this falls as K grows. Figures are the median and the mean over every timed call, in microseconds per
request; the machine has 2 cores shared with other work, so run it twice and compare medians.

Run:  python bench/tracker_cost.py                     (about a minute)
      PYTHONPATH=/tmp/old bench/tracker_cost.py        (another copy of detectors/ and guard_agent/ first)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import detectors.trackers
from detectors.trackers import GlobalFingerprintIndex, SessionTrackers, fit_tracker_config
from guard_agent.sessions.base import SessionRecord
from guard_agent.tracking import SessionTracking

SALT = b"bench-tracker-cost-salt"
MODEL = "digits"


class _Answer:
    labels = None

    def __init__(self, probabilities: np.ndarray) -> None:
        self.probabilities = probabilities


_LOOP = asyncio.new_event_loop()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one hook on a loop of its own: ``SessionTracking`` hashes through a per-turn batcher
    (``guard_agent.batching``), which needs a running loop; a request alone pays its one extra callback."""
    return _LOOP.run_until_complete(coro)


def _timed(fn: Callable[[], Any], samples: list[float]) -> Any:
    start = time.perf_counter()
    out = fn()
    samples.append(time.perf_counter() - start)
    return out


class Bench:
    """A fitted engine, a warm global index and warm sessions, driven through ``SessionTracking``."""

    def __init__(self, entries: int, sessions: int, seed: int) -> None:
        X, y = load_digits(return_X_y=True)
        X = X.astype(np.float64)
        perm = np.random.default_rng(0).permutation(len(X))
        ref, held = perm[:1200], perm[1200:]
        self.model = LogisticRegression(max_iter=3000).fit(X[ref], y[ref])
        cfg = fit_tracker_config(X[ref], self.model.predict(X[ref]), seed=0)
        self.index = GlobalFingerprintIndex()
        self.tracking = SessionTracking({MODEL: cfg}, salt=SALT, global_index=self.index)
        self.engine: SessionTrackers = self.tracking.engine(MODEL, X.shape[1])
        self.rng = np.random.default_rng(seed)
        self.held = X[held]
        self.now = 1000.0
        self._warm_index(entries)
        self.records = [SessionRecord(self.now, self.now) for _ in range(sessions)]
        for _ in range(40):
            for i in range(sessions):
                self.request(i, 1)

    def _warm_index(self, entries: int) -> None:
        """Distinct inputs from many sessions (noisy held-out digits and uniform rows) until ``entries`` are stored."""
        n = 0
        while len(self.index) < entries and n < 10 * entries:
            base = self.held[self.rng.integers(len(self.held), size=256)]
            rows = np.clip(base + self.rng.normal(0.0, 2.0, size=base.shape), 0.0, 16.0)
            rows[::2] = self.rng.uniform(0.0, 16.0, size=rows[::2].shape)
            fps = self.engine.fingerprints(rows)
            keys = self.engine.row_keys(rows)
            dens = self.engine.reference_density(fps, self.index.match_threshold)
            for j in range(rows.shape[0]):
                self.index.observe(f"warm-{n % 997}", fps[j : j + 1], keys[j : j + 1], self.now, dens[j : j + 1])
                n += 1
                self.now += 0.01

    def rows(self, n: int) -> np.ndarray:
        """``n`` held-out rows, some with a little noise (distinct inputs, near-duplicates now and then)."""
        x: np.ndarray = self.held[self.rng.integers(len(self.held), size=n)].copy()
        noisy = self.rng.random(n) < 0.3
        x[noisy] = np.clip(x[noisy] + self.rng.normal(0.0, 0.3, size=x[noisy].shape), 0.0, 16.0)
        return x

    def request(self, i: int, n: int, total: list[float] | None = None) -> None:
        """One request of ``n`` rows for session ``i`` through peek and update, timed into ``total``."""
        x = self.rows(n)
        answer = _Answer(self.model.predict_proba(x))
        rec = self.records[i]
        self.now += 0.01
        start = time.perf_counter()
        scores = _run(self.tracking.peek(f"s{i}", rec, x, MODEL, self.now))
        _run(self.tracking.update(f"s{i}", rec, x, MODEL, answer, self.now, scores))
        if total is not None:
            total.append(time.perf_counter() - start)

    def together(self, k: int, samples: list[float]) -> None:
        """``k`` one-row requests of distinct sessions at once (``asyncio.gather``: their peeks and updates share
        event-loop turns, so the per-turn batchers serve them together), timed per request into ``samples``."""
        first = int(self.rng.integers(len(self.records)))
        sessions = [(first + j) % len(self.records) for j in range(k)]
        rows = [self.rows(1) for _ in sessions]
        answers = [_Answer(self.model.predict_proba(x)) for x in rows]
        self.now += 0.01
        now = self.now

        async def one(i: int, x: np.ndarray, answer: _Answer) -> None:
            rec = self.records[i]
            scores = await self.tracking.peek(f"s{i}", rec, x, MODEL, now)
            await self.tracking.update(f"s{i}", rec, x, MODEL, answer, now, scores)

        async def all_of_them() -> None:
            await asyncio.gather(*(one(i, x, a) for i, x, a in zip(sessions, rows, answers, strict=True)))

        start = time.perf_counter()
        _run(all_of_them())
        samples.append((time.perf_counter() - start) / k)

    def parts(self, i: int, n: int, out: dict[str, list[float]]) -> None:
        """The same request, its steps timed one by one as ``SessionTracking`` runs them (``hashes``: the
        fingerprints and exact-row keys, by ``request_hashes`` where the engine has it, else separately)."""
        x = self.rows(n)
        proba = self.model.predict_proba(x)
        rec = self.records[i]
        self.now += 0.01
        eng, now = self.engine, self.now
        state = rec.tracker_state[eng.config.layout_id]
        _timed(lambda: eng.peek(state, now), out["peek scores"])
        extra: dict[str, Any] = {}
        if hasattr(eng, "request_hashes"):
            fps, keys, extra["digests"] = _timed(lambda: eng.request_hashes(x), out["hashes"])
        else:
            fps, keys = _timed(lambda: (eng.fingerprints(x), eng.row_keys(x)), out["hashes"])
        dens = _timed(lambda: eng.reference_density(fps, self.index.match_threshold), out["density"])
        g = _timed(lambda: self.index.observe(f"s{i}", fps, keys, now, dens), out["global observe"])
        new, _ = _timed(lambda: eng.update(state, x, None, proba, now, global_fingerprint=g, fingerprints=fps,
                                           **extra), out["update"])
        labels = np.argmax(proba, axis=1)
        _timed(lambda: self.index.learn(fps, labels, now, keys), out["global learn"])
        rec.tracker_state = {eng.config.layout_id: new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=20_000, help="stored fingerprints in the warm global index")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3000, help="timed 1-row requests (64-row: a tenth)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"code: {detectors.trackers.__file__}")
    bench = Bench(args.entries, args.sessions, args.seed)
    print(f"global index: {len(bench.index)} entries; {args.sessions} warm sessions")
    print(f"{'rows':>4}  {'part':<16} {'median us':>10} {'mean us':>10}")
    for rows, count in ((1, args.requests), (64, max(20, args.requests // 10))):
        total: list[float] = []
        parts: dict[str, list[float]] = {k: [] for k in ("peek scores", "hashes", "density", "global observe",
                                                           "update", "global learn")}
        for k in range(count):  # interleaved, so both see the same machine load
            bench.request(k % args.sessions, rows, total)
            bench.parts((k + 1) % args.sessions, rows, parts)
        for name, samples in (("total", total), *parts.items()):
            print(f"{rows:>4}  {name:<16} {statistics.median(samples) * 1e6:>10.1f} "
                  f"{statistics.fmean(samples) * 1e6:>10.1f}")
        med_sum = sum(statistics.median(s) for s in parts.values()) * 1e6
        print(f"{rows:>4}  {'sum of parts':<16} {med_sum:>10.1f}")
    for k in (1, 4, 16):
        samples: list[float] = []
        for _ in range(max(20, args.requests // k)):
            bench.together(k, samples)
        print(f"{1:>4}  {f'{k} at once':<16} {statistics.median(samples) * 1e6:>10.1f} "
              f"{statistics.fmean(samples) * 1e6:>10.1f}")


if __name__ == "__main__":
    main()
