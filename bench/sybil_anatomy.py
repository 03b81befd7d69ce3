"""Why spread (sybil) HopSkipJump / Boundary attacks still get answers: where the global index lets queries through.

In process, with the same harness as ``bench/global_index.py`` (LogisticRegression on digits, trackers fitted on
the training split, the default policy's blocking session rules, each attack round-robin over ``--keys`` keys,
a blocked key retired after 3 refusals). Per attack run it prints:

- queries answered, split by m' (the discounted count of ``session.global_fingerprint``) at the time of the query;
- the global-index entries (clusters) the queries went to: how many queries each received, how many of them were
  answered before the entry's count reached the block level, and how many answered queries got a predicted
  label other than the entry's first (boundary probes straddle the decision boundary; benign edits rarely do);
- the keys that were never blocked: queries each and how many of their queries scored >= 0.5 / >= 0.8;
- the reference density the index saw (the dense-region discount).

Then the same 3,000 benign sessions as ``bench/attacks.py``: the per-query distribution of
``session.global_fingerprint``, sessions with 1, 2, 3 queries at >= 0.5, and label disagreement in their clusters.

Reads the index's private ring arrays (``_head``, ``_weight``) to name the entry a query joined: a diagnostic,
not an interface.

With ``--flip-weights``, it also simulates a candidate change (not in the guard) on 16 images per attack: each
answer of another class than an entry's first adds ``w`` to the entry's weight; per w: attack runs within 1.5x of
unguarded, benign sessions alerted and the highest benign global score.

Run:  python bench/sybil_anatomy.py                   (4 images per attack, 3,000 benign sessions; about 1 min)
      python bench/sybil_anatomy.py --benign 0 --images 2
      python bench/sybil_anatomy.py --images 0 --flip-weights 0 1 3     (about 8 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_index import SALT, alerting, benign_replay, digits_setup, sybil_run, unguarded_l2

from detectors.trackers import GlobalFingerprintIndex
from guard_agent.sessions.base import SessionRecord
from guard_agent.tracking import SessionTracking

BANDS = (0.0, 1.0, 8.0, 19.0, 35.0)  # m' bands: 0, [1, 8) below score 0.5, [8, 19) below 0.8, [19, 35) below 0.95


@dataclass
class Query:
    session: str
    score: float
    m: float  # m' (discounted count) recovered from the score
    density: float | None
    entry: int  # the entry the query created or was merged into; -1: an exact repeat (or no fingerprint)
    label: int | None = None  # predicted class, when answered


@dataclass
class Recorder:
    queries: list[Query] = field(default_factory=list)


class RecordingIndex(GlobalFingerprintIndex):
    """The in-memory index, recording per observed request its score and the entry its row went to.

    ``flip_weight`` > 0 simulates a candidate change (not in the guard): an entry remembers the class of its first
    answer, and each later answer of another class adds ``flip_weight`` to its weight (boundary probes count more).
    """

    def __init__(self, recorder: Recorder, flip_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.flip_weight = flip_weight
        self._first_label: dict[int, int] = {}

    def learn_label(self, entry: int, label: int) -> None:
        """The model's answer to a query that created or joined ``entry`` (the simulated change)."""
        if entry < 0 or self.flip_weight <= 0:
            return
        first = self._first_label.setdefault(entry, label)
        if first != label:
            self._weight[entry] += self.flip_weight

    def observe(self, session_id: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                density: np.ndarray | Callable[[int], float] | None = None) -> float:
        seen: list[float] = []

        def lookup(i: int) -> float:
            value = float(density(i)) if callable(density) else 0.0
            seen.append(value)
            return value

        weights, head = self._weight.copy(), self._head
        score = super().observe(session_id, fingerprints, digests, now, lookup)
        if self._head != head:
            entry = (self._head - 1) % self.max_entries
            self._first_label.pop(entry, None)  # a new entry in this ring slot
        else:
            changed = np.flatnonzero(self._weight != weights)
            entry = int(changed[0]) if changed.size else -1
        m = math.inf if score >= 1.0 else -self.m_half * math.log2(1.0 - score)
        self.recorder.queries.append(Query(session_id, score, m, seen[0] if seen else None, entry))
        return score


def _labelled(tracking: SessionTracking, recorder: Recorder) -> None:
    """Record the predicted label of every answered query on its ``Query`` (and pass it to the index)."""
    update = tracking.update
    index = tracking.global_index
    assert isinstance(index, RecordingIndex)

    async def wrapped(session: str, record: SessionRecord, features: np.ndarray, model: str | None,
                      response: Any, now: float, scores: Any) -> Any:
        for q in reversed(recorder.queries):
            if q.session == session:
                q.label = int(np.argmax(response.probabilities[0]))
                index.learn_label(q.entry, q.label)
                break
        return await update(session, record, features, model, response, now, scores)

    tracking.update = wrapped  # type: ignore[method-assign]


def clusters(queries: list[Query], min_sessions: int = 1) -> list[tuple[int, int, int]]:
    """Per entry with >= 2 queries from >= ``min_sessions`` sessions: (queries, answered, answered with a label
    other than the entry's first answered label), largest first."""
    by_entry: dict[int, list[Query]] = {}
    for q in queries:
        if q.entry >= 0:
            by_entry.setdefault(q.entry, []).append(q)
    out = []
    for qs in by_entry.values():
        if len(qs) < 2 or len({q.session for q in qs}) < min_sessions:
            continue
        labels = [q.label for q in qs if q.label is not None]
        out.append((len(qs), len(labels), sum(lab != labels[0] for lab in labels) if labels else 0))
    return sorted(out, reverse=True)


def attack_report(method: str, image: int, X: np.ndarray, clf: Any, config: Any, keys: int) -> None:
    recorder = Recorder()
    tracking = SessionTracking({"": config}, salt=SALT, global_index=RecordingIndex(recorder, m_half=8.0))
    _labelled(tracking, recorder)
    loop = asyncio.new_event_loop()
    try:
        run = sybil_run(method, X[image], clf, tracking, keys, 1000.0 * image, loop, image)
    finally:
        loop.close()
    base = unguarded_l2(method, X[image], clf, image)
    qs = recorder.queries
    answered = [q for q in qs if q.label is not None]
    bands = np.histogram([q.m for q in answered], bins=[*BANDS, math.inf])[0].tolist()
    cl = clusters(qs)
    singles = sum(1 for q in qs if q.entry >= 0) - sum(n for n, _, _ in cl)
    by_key: dict[str, list[Query]] = {}
    for q in qs:
        by_key.setdefault(q.session, []).append(q)
    survivors = [v for v in by_key.values() if all(q.label is not None for q in v)]
    dens = [q.density for q in qs if q.density]
    print(f"## {method} image {image}: best L2 {run['best_l2']:.2f} (unguarded {base:.2f}, goal <= {1.5 * base:.2f}: "
          f"{'REACHED' if run['best_l2'] <= 1.5 * base else 'not reached'}); {run['sent']} queries sent, "
          f"{len(qs)} scored, {len(answered)} answered; first block at query {run['first_block']}")
    print(f"- answered by m' band [0,1) [1,8) [8,19) [19,35) >=35: {bands}")
    print(f"- entries with >= 2 queries: {len(cl)}, queries in entries of their own: {singles}; largest (queries, "
          f"answered, answered with another label than the first): {cl[:6]}")
    print(f"- keys never blocked: {len(survivors)} of {len(by_key)}; (queries, >=0.5, >=0.8) each: "
          f"{sorted((len(v), sum(q.score >= 0.5 for q in v), sum(q.score >= 0.8 for q in v)) for v in survivors)}")
    print(f"- reference density > 0 on {len(dens)} queries (max {max(dens, default=0.0):.4f})")


async def benign_run(X: np.ndarray, clf: Any, config: Any, n: int, flip_weight: float = 0.0) -> tuple[Recorder, int]:
    """The benign sessions of ``bench/global_index.py``; (recorder, sessions reaching an alert level)."""
    recorder = Recorder()
    tracking = SessionTracking({"": config}, salt=SALT,
                               global_index=RecordingIndex(recorder, flip_weight, m_half=8.0))
    _labelled(tracking, recorder)
    alerted = {s async for s, scores, new in benign_replay(tracking, X, clf, n) if alerting(scores, new)}
    return recorder, len(alerted)


async def benign_report(X: np.ndarray, clf: Any, config: Any, n: int) -> None:
    recorder, _ = await benign_run(X, clf, config, n)
    g = np.array([q.score for q in recorder.queries])
    per: dict[str, list[float]] = {}
    for q in recorder.queries:
        per.setdefault(q.session, []).append(q.score)
    print(f"## benign: {n} sessions, {g.size} queries")
    for th in (0.1, 0.3, 0.5, 0.6, 0.7, 0.8):
        counts = [sum(v >= th for v in vs) for vs in per.values()]
        print(f"- score >= {th}: {np.mean(g >= th):.5f} of queries; sessions with >= 1 / 2 / 3 such queries: "
              f"{sum(c >= 1 for c in counts)} / {sum(c >= 2 for c in counts)} / {sum(c >= 3 for c in counts)}")
    cl = clusters(recorder.queries, min_sessions=3)
    print(f"- entries with queries from >= 3 sessions: {len(cl)}; with a label other than the first: "
          f"{sum(d > 0 for _, _, d in cl)}; answered queries with another label: {sum(d for _, _, d in cl)} of "
          f"{sum(a for _, a, _ in cl)}")


def flip_trade_off(X: np.ndarray, clf: Any, config: Any, keys: int, images: list[int], weights: list[float],
                   n_benign: int) -> None:
    """The simulated change per ``flip_weight``: attack runs within 1.5x of unguarded, benign alerts and headroom."""
    base = {(m, i): unguarded_l2(m, X[i], clf, i) for m in ("hsj", "boundary") for i in images}
    print("| flip weight | HSJ runs within 1.5x | Boundary runs within 1.5x | median best/unguarded L2 (HSJ, "
          "Boundary) | benign sessions alerted | highest benign global score |")
    print("|---|---|---|---|---|---|")
    for w in weights:
        cells = []
        for method in ("hsj", "boundary"):
            recorder = Recorder()
            tracking = SessionTracking({"": config}, salt=SALT, global_index=RecordingIndex(recorder, w, m_half=8.0))
            _labelled(tracking, recorder)
            loop = asyncio.new_event_loop()
            try:  # one index for every image, as bench/global_index.py (images are 1,000 s apart)
                runs = [sybil_run(method, X[i], clf, tracking, keys, 1000.0 * i, loop, i) for i in images]
            finally:
                loop.close()
            ratios = [r["best_l2"] / base[(method, i)] for r, i in zip(runs, images, strict=True)]
            cells.append((sum(q <= 1.5 for q in ratios), float(np.median(ratios))))
        recorder, alerted = asyncio.run(benign_run(X, clf, config, n_benign, w))
        highest = max((q.score for q in recorder.queries), default=0.0)
        print(f"| {w:g} | {cells[0][0]}/{len(images)} | {cells[1][0]}/{len(images)} | {cells[0][1]:.2f}, "
              f"{cells[1][1]:.2f} | {alerted}/{n_benign} | {highest:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--images", type=int, default=4, help="attacked test images per method")
    ap.add_argument("--benign", type=int, default=3000)
    ap.add_argument("--flip-weights", type=float, nargs="*", default=[],
                    help="also simulate answers of another class adding this weight (e.g. 0 1 3; 16 images each)")
    ap.add_argument("--flip-images", type=int, default=16)
    args = ap.parse_args()

    X_test, clf, config = digits_setup()
    for method in ("hsj", "boundary"):
        for image in range(10, 10 + args.images):  # the images bench/global_index.py attacks
            attack_report(method, image, X_test, clf, config, args.keys)
    if args.benign:
        asyncio.run(benign_report(X_test, clf, config, args.benign))
    if args.flip_weights:
        flip_trade_off(X_test, clf, config, args.keys, list(range(10, 10 + args.flip_images)), args.flip_weights,
                       args.benign or 3000)


if __name__ == "__main__":
    main()
