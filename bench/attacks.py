"""Attack benchmark: real attacks over HTTP through the running guard in front of the real MLServer digits model.

Starts MLServer 1.7.1 (mlserver-sklearn, a LogisticRegression on digits), fits a profile (every
detector plus the session trackers) on the training split, runs ``guard-agent run`` in front of the
model with the default policy (rate limit raised so that the trackers, not the token bucket, are
measured; see --keep-rate-limit), then:

- black-box evasion with ART: HopSkipJump and BoundaryAttack through a BlackBoxClassifier whose predict
  calls the guard (a refused query gives the attack nothing; a key refused 3 times in a row is given
  up, and when all its keys are given up the attack stops);
- extraction: ART CopycatCNN and KnockoffNets (random sampling) with a scikit-learn thief, a
  Jacobian-augmentation (JBDA) attacker, uniform random queries, and a natural-data attacker using
  8x8 grey patches of scikit-learn's sample photographs (another distribution than digits);
- each attack under its own key, and split round-robin over 10 and 50 keys (sybil);
- benign sessions: test-split digits in random order with exact retries, small-noise near-duplicates,
  one-pixel shifts and bursts (all of a session's queries at once).

Queries go one row per request. Decision events (the guard's stdout, allow events not sampled) are
joined to queries by X-Request-Id. Per attack the table shows: runs, runs detected (any alert), median
and worst queries until the first alert (flag/harden/throttle/block) and the first block, runs stopped
(every key given up), attacker success (goal reached with the answers it got before being stopped):
evasion = an adversarial example within 1.5x the L2 distance the same attack reaches unguarded;
extraction = a thief (logistic regression on the answered queries) agreeing with the victim on >= 80 %
of the test split; for evasion the result column also gives the query at which the goal was first
reached. Benign: false-positive rate per session (any alert / any block) and per query.

Run:  /work/venv/bin/python bench/attacks.py            (about 10-15 minutes on 2 cores)
      /work/venv/bin/python bench/attacks.py --quick    (smaller, for a smoke run)
      /work/venv/bin/python bench/attacks.py --only benign --policy default   (benign false positives only)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import free_port, wait_ready

from guard_agent.attacks import (
    AttackResult,
    GuardClient,
    black_box_evasion,
    extraction_attack,
    natural_patches,
)

ALERTS = {"flag", "harden", "throttle", "block"}
CLIP = (0.0, 16.0)
N_CLASSES = 10


# ---- processes ---------------------------------------------------------------------------------------
@contextmanager
def process(argv: list[str], *, stdout: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start one process; stop exactly that process (by its pid) on exit."""
    with open(stdout, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def write_mlserver_repo(root: Path, X: np.ndarray, y: np.ndarray, port: int) -> Any:
    """MLServer model repository (joblib is MLServer's own format; only this benchmark writes it)."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    model_dir = root / "digits"
    model_dir.mkdir(parents=True, exist_ok=True)
    clf = LogisticRegression(max_iter=3000).fit(X, y)
    joblib.dump(clf, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0, "debug": False}))
    return clf


def write_profile(out: Path, X: np.ndarray, y: np.ndarray) -> None:
    from detectors import fit_profile, save_profile
    from detectors.trackers import fit_tracker_config

    trackers = fit_tracker_config(X, y, seed=0).to_parts()
    save_profile(fit_profile(X, labels=y, fpr=0.01, seed=0, extra_components={"trackers": trackers}), out)


SESSION_RULES = ("session-", "black-box-attack", "distributed-black-box-attack", "model-extraction")


def write_policy(path: Path, which: str, keep_rate_limit: bool) -> None:
    """The default policy, or (``sessions``) only its session-tracker rules; rate limit raised unless kept."""
    import yaml

    import guard_agent

    doc = yaml.safe_load((Path(guard_agent.__file__).parent / "default_policy.yaml").read_text())
    if which == "sessions":
        doc["rules"] = [r for r in doc["rules"] if str(r["id"]).startswith(SESSION_RULES)]
    if not keep_rate_limit:
        doc["rate_limit"] = {"requests_per_second": 5000, "burst": 10000}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found in this environment")
    return found


# ---- events --------------------------------------------------------------------------------------------
@dataclass
class RunEvents:
    """Alerts of one run, by query index (the request id suffix)."""

    first_alert: int | None = None
    first_block: int | None = None
    rules: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    alert_sessions: set[str] = field(default_factory=set)
    alerts: int = 0


def read_events(path: Path) -> dict[str, RunEvents]:
    """Alerts from the guard's decision events, grouped by run id (request id without its index)."""
    runs: dict[str, RunEvents] = defaultdict(RunEvents)
    with open(path, "rb") as fh:
        for line in fh:
            if not line.startswith(b"{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            action = ev.get("event", {}).get("action")
            rid = ev.get("http", {}).get("request", {}).get("id", "")
            if action not in ALERTS or "-" not in rid:
                continue
            run_id, _, idx = rid.rpartition("-")
            if not idx.isdigit():
                continue
            n = int(idx) + 1  # 1-based query number within the run
            r = runs[run_id]
            r.alerts += 1
            r.first_alert = n if r.first_alert is None else min(r.first_alert, n)
            if action == "block":
                r.first_block = n if r.first_block is None else min(r.first_block, n)
            r.rules[ev.get("rule", {}).get("name", "?")] += 1
            r.alert_sessions.add(ev.get("guard", {}).get("session", "?"))
    return runs


# ---- workloads -----------------------------------------------------------------------------------------
@dataclass
class Setup:
    guard: str
    direct: str
    X_test: np.ndarray
    y_victim: np.ndarray
    rng: np.random.Generator


def evasion_goals(setup: Setup, images: list[int], method: str, budget: int) -> dict[int, float]:
    """1.5x the L2 distance the attack reaches against the unguarded model, per image."""
    goals = {}
    for i in images:
        client = GuardClient(setup.direct, [f"baseline-{method}-{i}"], f"baseline-{method}-{i}")
        res = black_box_evasion(client, setup.X_test[i], method=method, goal_l2=0.0,  # type: ignore[arg-type]
                                n_classes=N_CLASSES, clip=CLIP, seed=i, budget=budget)
        client.close()
        goals[i] = 1.5 * res.detail["best_l2"]
    return goals


def run_evasion(setup: Setup, method: str, images: list[int], goals: dict[int, float], n_keys: int,
                budget: int) -> list[AttackResult]:
    out = []
    for i in images:
        run_id = f"{method}-k{n_keys}-img{i}"
        keys = [f"{run_id}-key{k}-{secrets.token_hex(4)}" for k in range(n_keys)]
        client = GuardClient(setup.guard, keys, run_id)
        out.append(black_box_evasion(client, setup.X_test[i], method=method,  # type: ignore[arg-type]
                                     goal_l2=goals[i], n_classes=N_CLASSES, clip=CLIP, seed=i, budget=budget))
        client.close()
    return out


def run_extraction(setup: Setup, method: str, runs: int, n_keys: int, n_queries: int) -> list[AttackResult]:
    out = []
    for s in range(runs):
        run_id = f"{method}-k{n_keys}-r{s}"
        keys = [f"{run_id}-key{k}-{secrets.token_hex(4)}" for k in range(n_keys)]
        client = GuardClient(setup.guard, keys, run_id)
        seed = 1000 + 100 * n_keys + s  # every run its own queries (the global index remembers earlier runs)
        rng = np.random.default_rng(seed)
        if method == "jbda":
            pool = setup.X_test[rng.choice(len(setup.X_test), 10, replace=False)]
        elif method == "uniform":
            pool = None
        else:
            pool = natural_patches(rng, n_queries)
        out.append(extraction_attack(client, method, n_queries=n_queries, pool=pool,  # type: ignore[arg-type]
                                     X_eval=setup.X_test, y_victim=setup.y_victim, goal_fidelity=0.8,
                                     n_classes=N_CLASSES, clip=CLIP, seed=seed))
        client.close()
    return out


def benign_session(X: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Held-out digits in random order, 10 % exact retries, 5 % small-noise near-duplicates, 5 % shifts."""
    rows: list[np.ndarray] = []
    order = rng.permutation(len(X))
    k = 0
    for _ in range(n):
        u = rng.random()
        if rows and u < 0.10:
            rows.append(rows[int(rng.integers(len(rows)))].copy())
        elif rows and u < 0.15:
            base = rows[int(rng.integers(len(rows)))]
            rows.append(np.clip(base + rng.normal(0, 0.3, base.shape), *CLIP))
        elif rows and u < 0.20:
            img = rows[int(rng.integers(len(rows)))].reshape(8, 8)
            rows.append(np.roll(img, int(rng.choice([-1, 1])), axis=int(rng.integers(2))).reshape(-1))
        else:
            rows.append(X[order[k % len(order)]].astype(np.float64))
            k += 1
    return np.asarray(rows)


async def run_benign(setup: Setup, sessions: int, concurrency: int) -> tuple[int, dict[int, int]]:
    """Benign sessions, ``concurrency`` at a time; each sends its queries back to back (a burst)."""
    import aiohttp
    import orjson

    statuses: dict[int, int] = defaultdict(int)
    total = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for s in range(sessions):
        queue.put_nowait(s)

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal total
        while not queue.empty():
            s = queue.get_nowait()
            rng = np.random.default_rng(50_000 + s)
            rows = benign_session(setup.X_test, rng, int(rng.integers(8, 41)))
            key = f"benign-{s}-{secrets.token_hex(4)}"
            for i, row in enumerate(rows):
                body = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP64",
                                                 "data": row.tolist()}], "outputs": [{"name": "predict_proba"}]})
                headers = {"Content-Type": "application/json", "X-API-Key": key, "X-Request-Id": f"benign{s}-{i}"}
                async with http.post(setup.guard + "/v2/models/digits/infer", data=body, headers=headers) as r:
                    await r.read()
                    statuses[r.status] += 1
                total += 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return total, statuses


# ---- report --------------------------------------------------------------------------------------------
def _med(values: list[int]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def _max(values: list[int], missing: int) -> str:
    if not values:
        return "-"
    return f"{max(values)}" + (f" (+{missing} never)" if missing else "")


def table_row(name: str, results: list[AttackResult], events: dict[str, RunEvents]) -> str:
    firsts = [events[r.run_id].first_alert for r in results if r.run_id in events]
    blocks = [events[r.run_id].first_block for r in results if r.run_id in events]
    alerts = [f for f in firsts if f is not None]
    blocked = [b for b in blocks if b is not None]
    detected = len(alerts)
    key_total = sum(r.keys for r in results)
    keys_alerted = sum(len(events[r.run_id].alert_sessions) for r in results if r.run_id in events)
    metric = "best_l2" if "best_l2" in results[0].detail else "fidelity"
    vals = [r.detail[metric] for r in results]
    metric_txt = f"{metric} {statistics.median(vals):.2f}"
    reached = [int(r.detail["goal_at"]) for r in results if "goal_at" in r.detail]
    if reached:
        metric_txt += f"; goal reached at query {_med(reached)}"
    rules: dict[str, int] = defaultdict(int)
    for r in results:
        for rule, c in events.get(r.run_id, RunEvents()).rules.items():
            rules[rule] += c
    top = ",".join(k for k, _ in sorted(rules.items(), key=lambda kv: -kv[1])[:2]) or "-"
    return (f"| {name} | {len(results)} | {results[0].keys} | {detected}/{len(results)} | {keys_alerted}/{key_total} | "
            f"{_med(alerts)} / {_max(alerts, len(results) - detected)} | "
            f"{_med(blocked)} / {_max(blocked, len(results) - len(blocked))} | "
            f"{sum(r.stopped for r in results)}/{len(results)} | {sum(r.success for r in results)}/{len(results)} | "
            f"{metric_txt} | {top} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs and benign sessions (smoke run)")
    ap.add_argument("--benign", type=int, default=None, help="benign sessions (default 3000; --quick 200)")
    ap.add_argument("--keep-rate-limit", action="store_true", help="keep the default policy's rate limit")
    ap.add_argument("--policy", choices=("default", "sessions"), default="default",
                    help="the shipped default policy, or only its session-tracker rules (measures the trackers)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--only", choices=("all", "attacks", "benign"), default="all",
                    help="run only the attacks or only the benign sessions")
    args = ap.parse_args()
    quick = args.quick
    n_benign = args.benign if args.benign is not None else (200 if quick else 3000)
    n_img, n_syb = (3, 2) if quick else (10, 4)
    images = list(range(n_img))  # every run attacks its own image: the global index remembers earlier runs
    sybil = {10: list(range(n_img, n_img + n_syb)), 50: list(range(n_img + n_syb, n_img + 2 * n_syb))}
    ext_runs = 2 if quick else 10
    budget = 600

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    work = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    ml_port, g_port, a_port = free_port(), free_port(), free_port()
    clf = write_mlserver_repo(work / "mlserver", X_train, y_train, ml_port)
    write_profile(work / "profile", X_train, y_train)
    write_policy(work / "policy.yaml", args.policy, args.keep_rate_limit)
    print(f"# policy: {args.policy}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
    env.update({"GUARD_LISTEN": f"127.0.0.1:{g_port}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{a_port}",
                "GUARD_UPSTREAM": f"http://127.0.0.1:{ml_port}", "GUARD_POLICY": str(work / "policy.yaml"),
                "GUARD_PROFILE": str(work / "profile"), "GUARD_HMAC_KEY": secrets.token_hex(32),
                "GUARD_LOG_SAMPLE_ALLOW": "0"})
    ml_env = {**os.environ, "MLSERVER_LOGGING": "WARNING"}
    t0 = time.monotonic()
    with process([exe("mlserver"), "start", str(work / "mlserver")], stdout=work / "mlserver.log", env=ml_env) as ml:
        wait_ready(f"http://127.0.0.1:{ml_port}/v2/models/digits/ready", ml)
        with process([exe("guard-agent"), "run"], stdout=work / "events.jsonl", env=env) as guard:
            wait_ready(f"http://127.0.0.1:{a_port}/readyz", guard)
            setup = Setup(f"http://127.0.0.1:{g_port}", f"http://127.0.0.1:{ml_port}", X_test,
                          clf.predict(X_test), np.random.default_rng(0))
            results: list[tuple[str, list[AttackResult]]] = []
            for method in ("hsj", "boundary") if args.only != "benign" else ():
                goals = evasion_goals(setup, images + sybil[10] + sybil[50], method, budget)
                print(f"# {method}: unguarded median best L2 {statistics.median(g / 1.5 for g in goals.values()):.2f}",
                      flush=True)
                results.append((f"{method} (ART)", run_evasion(setup, method, images, goals, 1, budget)))
                for k in (10, 50):
                    results.append((f"{method} (ART) sybil", run_evasion(setup, method, sybil[k], goals, k, budget)))
            for method, n_q in (("copycat", 500), ("knockoff", 500), ("natural", 500), ("jbda", 300),
                                ("uniform", 300)) if args.only != "benign" else ():
                results.append((method, run_extraction(setup, method, ext_runs, 1, n_q)))
                for k in (10, 50):
                    results.append((f"{method} sybil", run_extraction(setup, method, max(1, ext_runs // 5), k, n_q)))
            print(f"# attacks done in {time.monotonic() - t0:.0f}s; benign sessions: {n_benign}", flush=True)
            tb = time.monotonic()
            if args.only == "attacks":
                n_benign = 0
            total, statuses = asyncio.run(run_benign(setup, n_benign, args.concurrency))
            print(f"# benign: {total} queries in {time.monotonic() - tb:.0f}s, statuses {dict(statuses)}", flush=True)
            time.sleep(1.0)
    events = read_events(work / "events.jsonl")
    print()
    print("| attack | runs | keys/run | runs detected | keys alerted | queries to 1st alert (median / worst) |"
          " queries to 1st block (median / worst) | runs stopped | attacker success | result | top rules |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, res in results:
        print(table_row(name, res, events))
    benign = {k: v for k, v in events.items() if k.startswith("benign")}
    flagged = len(benign)
    blocked = sum(1 for v in benign.values() if v.first_block is not None)
    alert_q = sum(v.alerts for v in benign.values())
    rules: dict[str, int] = defaultdict(int)
    for v in benign.values():
        for rule, c in v.rules.items():
            rules[rule] += c
    print()
    print(f"benign: {n_benign} sessions, {total} queries; sessions with any alert {flagged} "
          f"({100 * flagged / max(1, n_benign):.2f} %), sessions blocked {blocked} "
          f"({100 * blocked / max(1, n_benign):.2f} %); "
          f"alerted queries {alert_q} ({100 * alert_q / max(1, total):.3f} %); rules {dict(rules)}")
    print(f"work dir (events, logs): {work}")


if __name__ == "__main__":
    main()
