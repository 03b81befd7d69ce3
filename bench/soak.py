"""Soak: a real `guard-agent run` under a steady request rate for minutes, RSS sampled.

Not in CI (it runs for 10 minutes by default). Starts the built-in digits model
server in its own process, fits a profile, starts the guard as a subprocess (so
its RSS is its own), then sends a steady open-loop mix: benign inference from a
bounded pool of API keys, a share of invalid bodies and refused routes. Reports
RSS after warm-up and its growth (the issue's bar: < 5 %), plus status counts
and latency.

    python -m bench.soak [--minutes 10] [--rate 100] [--warmup 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import cpu_seconds, free_port, wait_ready

__all__ = ["Stack", "free_port", "rss_kib", "start_stack"]

_MODEL_SERVER = """
import asyncio, sys
from aiohttp import web
from guard_agent.demo import DigitsModel, make_model_app
web.run_app(make_model_app(DigitsModel()), host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
            print=None)
"""


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Stack:
    """A model server and a guard in front of it, both real processes on loopback."""

    guard_url: str
    admin_url: str
    model_url: str
    guard: subprocess.Popen[bytes]
    model: subprocess.Popen[bytes]
    workdir: Path
    x_test: Any


@contextlib.contextmanager
def start_stack(*, profile: bool = True, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Start model + guard; stops both (by their own pids) on exit."""
    from guard_agent.demo import DigitsModel

    workdir = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    model_port, port, admin = free_port(), free_port(), free_port()
    model = subprocess.Popen([sys.executable, "-c", _MODEL_SERVER, str(model_port)])
    guard: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(f"http://127.0.0.1:{model_port}/v2/health/ready", model)
        digits = DigitsModel()
        guard_env = {**os.environ, "GUARD_LISTEN": f"127.0.0.1:{port}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                     "GUARD_UPSTREAM": f"http://127.0.0.1:{model_port}", "GUARD_HMAC_KEY": "bench-hmac-key",
                     "GUARD_LOG_SAMPLE_ALLOW": "0.01", **(env or {})}
        if profile:
            import numpy as np

            from detectors import fit_profile, save_profile

            save_profile(fit_profile(np.asarray(digits.X_train), fpr=0.01, seed=0), workdir / "profile", force=True)
            guard_env["GUARD_PROFILE"] = str(workdir / "profile")
        log = open(workdir / "guard.log", "wb")  # noqa: SIM115 - owned by the process
        guard = subprocess.Popen([sys.executable, "-m", "guard_agent.cli", "run"], env=guard_env,
                                 stdout=log, stderr=subprocess.STDOUT)
        wait_ready(f"http://127.0.0.1:{admin}/readyz", guard)
        yield Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{model_port}",
                    guard, model, workdir, digits.X_test)
    finally:
        for proc in (guard, model):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _bodies(x_test: Any) -> list[bytes]:
    return [orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP64",
                                      "data": [float(v) for v in row]}],
                          "outputs": [{"name": "predict_proba"}]}) for row in x_test]


async def _one(http: aiohttp.ClientSession, url: str, kind: str, body: bytes, key: str,
               statuses: Counter[str], latencies: list[float], window: list[float]) -> None:
    t0 = time.perf_counter()
    try:
        if kind == "route":
            async with http.post(url + "/v2/repository/models/digits/unload", headers={"X-API-Key": key}) as r:
                await r.read()
        else:
            async with http.post(url + "/v2/models/digits/infer", data=body,
                                 headers={"Content-Type": "application/json", "X-API-Key": key}) as r:
                await r.read()
        statuses[str(r.status)] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        statuses[type(exc).__name__] += 1
    latencies.append(time.perf_counter() - t0)
    window.append(time.perf_counter() - t0)


async def _drive(stack: Stack, *, seconds: float, rate: float, warmup: float, sample_every: float,
                 keys: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = _bodies(stack.x_test)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    samples: list[tuple[float, int]] = []
    windows: list[dict[str, Any]] = []
    window: list[float] = []
    cpu_prev, done_prev = cpu_seconds(stack.guard.pid), 0
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        next_sample = start
        n = 0
        while True:
            now = loop.time()
            if now - start >= seconds:
                break
            if now >= next_sample:
                samples.append((now - start, rss_kib(stack.guard.pid)))
                cpu, done = cpu_seconds(stack.guard.pid), len(latencies)
                if window:
                    w = sorted(window)
                    windows.append({"t": round(now - start), "done": done - done_prev,
                                    "p50_ms": round(1000 * w[len(w) // 2], 1),
                                    "p99_ms": round(1000 * w[int(len(w) * 0.99)], 1),
                                    "guard_cpu_ms_per_req": round(1000 * (cpu - cpu_prev) / max(1, done - done_prev),
                                                                  2)})
                window.clear()
                cpu_prev, done_prev = cpu, done
                next_sample += sample_every
            u = rng.random()
            kind = "route" if u < 0.03 else "bad" if u < 0.10 else "good"
            body = b'{"inputs": [' if kind == "bad" else rng.choice(bodies)
            task = asyncio.create_task(_one(http, stack.guard_url, kind, body, f"soak-key-{rng.randrange(keys):05d}",
                                            statuses, latencies, window))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            target = start + n / rate
            await asyncio.sleep(max(0.0, target - loop.time()))
        await asyncio.gather(*tasks)
    after = [rss for t, rss in samples if t >= warmup]
    minute = max(1, int(60 / sample_every))
    first, last = statistics.median(after[:minute]), statistics.median(after[-minute:])
    lat = sorted(latencies)
    return {
        "seconds": seconds, "rate": rate, "requests": len(latencies), "statuses": dict(statuses),
        "rss_kib": {"start": samples[0][1], "after_warmup_first_minute_median": first,
                    "last_minute_median": last, "max": max(r for _, r in samples)},
        "rss_growth_after_warmup_pct": round(100.0 * (last - first) / first, 2),
        "latency_ms": {"p50": round(1000 * lat[len(lat) // 2], 2), "p99": round(1000 * lat[int(len(lat) * 0.99)], 2),
                       "max": round(1000 * lat[-1], 2)},
        "samples": samples,
        "windows": windows,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (open loop)")
    p.add_argument("--warmup", type=float, default=120.0, help="seconds excluded from the growth figure")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--keys", type=int, default=2000, help="distinct API keys (sessions) in the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the full result (with RSS samples) here")
    args = p.parse_args(argv)
    with start_stack() as stack:
        result = asyncio.run(_drive(stack, seconds=args.minutes * 60, rate=args.rate, warmup=args.warmup,
                                    sample_every=args.sample_every, keys=args.keys, seed=args.seed))
        alive = stack.guard.poll() is None
    result["guard_alive_at_end"] = alive
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    summary = {k: v for k, v in result.items() if k not in ("samples", "windows")}
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    for w in result["windows"][:: max(1, len(result["windows"]) // 12)]:
        print(f"t={w['t']:>4}s done={w['done']:>5} p50={w['p50_ms']:>8}ms p99={w['p99_ms']:>8}ms "
              f"guard_cpu/req={w['guard_cpu_ms_per_req']}ms")
    ok = alive and result["rss_growth_after_warmup_pct"] < 5.0 and all(
        s[0] in "234" for s in result["statuses"])
    print("PASS" if ok else "FAIL",
          "(bar: RSS growth < 5% after warm-up, every request answered without 5xx or client error, guard alive)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
