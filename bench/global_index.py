"""The global index's trade-off (GUARD_GLOBAL_HALF_COUNT): sybil attacks stopped vs benign headroom.

In-process (no HTTP, minutes instead of the quarter hour of ``bench/attacks.py``): a LogisticRegression on
digits, trackers fitted on the training split, and for each half count:

- real ART HopSkipJump and BoundaryAttack, each query sent round-robin over ``--keys`` keys through
  ``SessionTracking`` (peek, the default policy's blocking session rules, update); a blocked key stays
  blocked and is retired after 3 refusals, a refused query answers the original label (it tells the attack
  nothing); per run: queries sent, first block, keys blocked, whether every key was blocked, and the best
  adversarial L2 distance the attack got answered (compare with the unguarded distance printed first);
- 3,000 benign sessions as in ``bench/attacks.py`` (held-out digits with retries, noise near-duplicates and
  one-pixel shifts), 16 at a time, 4 ms apart: sessions reaching an alert level, and the highest
  ``session.global_fingerprint`` seen (the headroom below the 0.95 block).

Run:  python bench/global_index.py                 (half counts 4 6 8, 50 keys; about 10 minutes)
      python bench/global_index.py --half-counts 8 --benign 500
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import benign_session

from detectors.trackers import GlobalFingerprintIndex, TrackerConfig, fit_tracker_config
from guard_agent.sessions.base import SessionRecord
from guard_agent.tracking import SessionTracking


def _session_rules(actions: frozenset[str]) -> tuple[tuple[str, float], ...]:
    """(score, gte threshold) of the shipped default policy's rules on one session score with these actions."""
    import yaml

    import guard_agent

    doc = yaml.safe_load((Path(guard_agent.__file__).parent / "default_policy.yaml").read_text())
    out = []
    for rule in doc["rules"]:
        (name, cond), *more = rule["when"].items()
        if not more and name.startswith("session.") and "gte" in cond and rule["action"] in actions:
            out.append((str(name), float(cond["gte"])))
    return tuple(out)


BLOCK_RULES = _session_rules(frozenset({"block"}))
ALERT_RULES = _session_rules(frozenset({"flag", "harden", "throttle", "block"}))
SALT = b"bench-global-index-salt"


class _Answer:
    labels = None

    def __init__(self, probabilities: np.ndarray) -> None:
        self.probabilities = probabilities


class _AllKeysBlocked(Exception):
    pass


def sybil_run(method: str, x0: np.ndarray, clf: Any, tracking: SessionTracking, keys: int, t0: float,
              loop: asyncio.AbstractEventLoop, seed: int) -> dict[str, Any]:
    """One ART attack on ``x0`` spread round-robin over ``keys`` keys through the trackers."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump

    from guard_agent.attacks._art import black_box_classifier

    y0 = int(clf.predict(x0[None])[0])
    records: dict[int, SessionRecord] = {}
    retired: set[int] = set()
    refusals: dict[int, int] = {}
    state: dict[str, Any] = {"sent": 0, "best": math.inf, "first_block": None}

    def ask(row: np.ndarray) -> int:
        live = [k for k in range(keys) if k not in retired]
        if not live:
            raise _AllKeysBlocked
        k = live[state["sent"] % len(live)]
        state["sent"] += 1
        now = t0 + 0.05 * state["sent"]
        rec = records.setdefault(k, SessionRecord(now, now))
        x = row[None, :]
        refused = rec.blocked_until > now
        if not refused:
            scores = loop.run_until_complete(tracking.peek(f"{seed}-{k}", rec, x, None, now))
            if any(scores.get(name, 0.0) >= t for name, t in BLOCK_RULES):
                rec.blocked_until = now + 300.0
                state["first_block"] = state["first_block"] or state["sent"]
                refused = True
        if refused:
            refusals[k] = refusals.get(k, 0) + 1
            if refusals[k] >= 3:
                retired.add(k)
            return y0
        proba = clf.predict_proba(x)
        loop.run_until_complete(tracking.update(f"{seed}-{k}", rec, x, None, _Answer(proba), now, scores))
        label = int(np.argmax(proba))
        if label != y0:
            state["best"] = min(state["best"], float(np.linalg.norm(row - x0)))
        return label

    def predict(x: np.ndarray) -> np.ndarray:
        rows = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        out: np.ndarray = np.eye(10)[[ask(r) for r in rows]]
        return out

    classifier = black_box_classifier(predict, x0.size, 10, (0.0, 16.0))
    np.random.seed(seed)  # ART draws from numpy's global generator
    attack = (HopSkipJump(classifier, targeted=False, max_iter=3, max_eval=200, init_eval=50, verbose=False)
              if method == "hsj" else
              BoundaryAttack(classifier, targeted=False, max_iter=30, num_trial=10, sample_size=10, init_size=100,
                             verbose=False))
    stopped = False
    try:
        attack.generate(x0[None].astype(np.float32))
    except _AllKeysBlocked:
        stopped = True
    blocked = sum(1 for r in records.values() if r.blocked_until > 0)
    return {"sent": state["sent"], "first_block": state["first_block"], "keys_blocked": blocked,
            "stopped": stopped, "best_l2": state["best"]}


def unguarded_l2(method: str, x0: np.ndarray, clf: Any, seed: int) -> float:
    """The attack's best L2 distance against the bare model, with the same budget."""
    tracking = _NoTracking()
    loop = asyncio.new_event_loop()
    try:
        return float(sybil_run(method, x0, clf, tracking, 1, 0.0, loop, seed)["best_l2"])  # type: ignore[arg-type]
    finally:
        loop.close()


class _NoTracking:
    async def peek(self, *args: Any) -> dict[str, float]:
        return {}

    async def update(self, *args: Any) -> dict[str, float]:
        return {}


async def benign_replay(tracking: SessionTracking, X: np.ndarray, clf: Any,
                        n: int) -> AsyncIterator[tuple[int, dict[str, float], dict[str, float]]]:
    """Replay ``n`` benign sessions (``bench/attacks.py``'s generator) through ``tracking``, 16 sessions at a
    time, interleaved 4 ms apart; yields (session number, the query's scores before the answer, after it)."""
    sessions = []
    for s in range(n):
        rng = np.random.default_rng(50_000 + s)
        sessions.append(benign_session(X, rng, int(rng.integers(8, 41))))
    t = 0.0
    for start in range(0, n, 16):
        group = list(range(start, min(n, start + 16)))
        records = {s: SessionRecord(t, t) for s in group}
        pos = dict.fromkeys(group, 0)
        while any(pos[s] < len(sessions[s]) for s in group):
            for s in group:
                if pos[s] >= len(sessions[s]):
                    continue
                x = sessions[s][pos[s]][None, :]
                pos[s] += 1
                t += 0.004
                scores = await tracking.peek(f"b{s}", records[s], x, None, t)
                new = await tracking.update(f"b{s}", records[s], x, None, _Answer(clf.predict_proba(x)), t, scores)
                yield s, scores, new


def alerting(scores: dict[str, float], new: dict[str, float]) -> bool:
    """Whether a query's scores (before and after the answer) reach one of the default policy's alert rules."""
    merged = {**scores, **new}
    return any(merged.get(name, 0.0) >= th for name, th in ALERT_RULES)


async def benign(config: TrackerConfig, half: float, X: np.ndarray, clf: Any, n: int) -> tuple[int, float, int]:
    """Benign sessions through fresh trackers: (sessions alerted, highest global score, queries)."""
    tracking = SessionTracking({"": config}, salt=SALT, global_index=GlobalFingerprintIndex(m_half=half))
    alerted: set[int] = set()
    highest, queries = 0.0, 0
    async for s, scores, new in benign_replay(tracking, X, clf, n):
        queries += 1
        highest = max(highest, scores["session.global_fingerprint"])
        if alerting(scores, new):
            alerted.add(s)
    return len(alerted), highest, queries


def digits_setup() -> tuple[np.ndarray, Any, TrackerConfig]:
    """The attacked model and the trackers' fit: LogisticRegression and ``fit_tracker_config`` on the training
    split of digits; returns the held-out inputs (the images attacked), the model and the tracker config."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    clf = LogisticRegression(max_iter=3000).fit(X_train, y_train)
    return X_test, clf, fit_tracker_config(X_train, y_train, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half-counts", type=float, nargs="+", default=[4.0, 6.0, 8.0])
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--images", type=int, default=4, help="attacked test images per method")
    ap.add_argument("--benign", type=int, default=3000)
    args = ap.parse_args()

    X_test, clf, config = digits_setup()
    images = list(range(10, 10 + args.images))
    base = {(m, i): unguarded_l2(m, X_test[i], clf, i) for m in ("hsj", "boundary") for i in images}
    medians = {m: statistics.median(v for (mm, _), v in base.items() if mm == m) for m in ("hsj", "boundary")}
    print(f"unguarded best L2 (same budget): hsj median {medians['hsj']:.2f}, "
          f"boundary median {medians['boundary']:.2f}")
    print()
    print(f"| half count | attack | runs | all {args.keys} keys blocked | keys blocked (median) | first block "
          "(median) | best L2 answered (median) | runs within 1.5x unguarded | benign sessions alerted | "
          "highest benign global score |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for half in args.half_counts:
        t0 = time.monotonic()
        alerted, highest, queries = asyncio.run(benign(config, half, X_test, clf, args.benign))
        for method in ("hsj", "boundary"):
            loop = asyncio.new_event_loop()
            tracking = SessionTracking({"": config}, salt=SALT, global_index=GlobalFingerprintIndex(m_half=half))
            runs = [sybil_run(method, X_test[i], clf, tracking, args.keys, 1000.0 * i, loop, i) for i in images]
            loop.close()
            within = sum(r["best_l2"] <= 1.5 * base[(method, i)] for r, i in zip(runs, images, strict=True))
            firsts = [r["first_block"] for r in runs if r["first_block"] is not None]
            print(f"| {half:g} | {method} | {len(runs)} | {sum(r['stopped'] for r in runs)}/{len(runs)} | "
                  f"{statistics.median(r['keys_blocked'] for r in runs):.0f} | "
                  f"{statistics.median(firsts) if firsts else '-'} | "
                  f"{statistics.median(r['best_l2'] for r in runs):.2f} | {within}/{len(runs)} | "
                  f"{alerted}/{args.benign} | {highest:.3f} |", flush=True)
        print(f"<!-- half count {half:g}: {queries} benign queries, {time.monotonic() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
