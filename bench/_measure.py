"""One measurement: closed-loop wrk or the open-loop generator against one target, with CPU accounting.

Load runs on the load core; the proxy under test's CPU time comes from /proc/<pid>/stat, and every
run also records how busy each core was in total (/proc/stat), so time stolen by other processes on
the proxy's core is visible next to the figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _servers import decision_counts
from _servers import tree_cpu_seconds as cpu_seconds

LOADGEN = Path(__file__).resolve().parent / "_loadgen.py"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass(frozen=True)
class Target:
    """Something to send requests to: its port, the pid to account CPU to, and what to send."""

    name: str
    port: int
    pid: int
    spec: Path  # request pool (JSON) for the open-loop generator
    lua: Path  # the same pool as a wrk script
    core: int  # where ``pid`` runs (the direct target's pid is the upstream, on the load core)
    admin_port: int | None = None
    workers: int = 1  # guard processes (GUARD_WORKERS); their CPU is summed with the supervisor's


def core_busy() -> dict[str, float]:
    """Busy seconds per CPU since boot (user+nice+system+irq+softirq+steal)."""
    out = {}
    hz = float(os.sysconf("SC_CLK_TCK"))
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                out[name] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz
    return out


def settle(pid: int, *, idle_share: float = 0.05, timeout: float = 15.0) -> float:
    """Wait until ``pid`` is (nearly) idle, so work queued by an overloaded run cannot spill into the next."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        c0 = cpu_seconds(pid)
        time.sleep(0.25)
        if cpu_seconds(pid) - c0 <= idle_share * 0.25:
            break
    return time.monotonic() - start


def idle_cpu(pids: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    """Each process's CPU share of a core while nobody sends it anything (timers, watchers, sweepers)."""
    c0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (cpu_seconds(pid) - c0[name]) / seconds for name, pid in pids.items()}


def _timed(
    target: Target,
    load_core: int,
    proxy_core: int,
    run: Callable[[], dict[str, Any]],
    requests_of: Callable[[dict[str, Any]], int],
    quiet: Sequence[int],
) -> dict[str, Any]:
    """Run ``run`` and add the target's CPU µs per request and the cores' busy shares.

    CPU per request counts until the target is idle again, so work an overloaded target finishes after
    the load stopped is charged to the requests that caused it.
    """
    for pid in {target.pid, *quiet}:
        settle(pid)
    before_dec = decision_counts(target.admin_port, target.workers) if target.admin_port else {}
    busy0, cpu0, t0 = core_busy(), cpu_seconds(target.pid), time.monotonic()
    result = run()
    busy1, cpu1, t1 = core_busy(), cpu_seconds(target.pid), time.monotonic()
    result["settle_s"] = settle(target.pid)
    cpu_all = cpu_seconds(target.pid) - cpu0
    wall = t1 - t0
    n = requests_of(result)
    proxy_cpu = cpu1 - cpu0
    result["cpu_s"] = cpu_all
    result["cpu_util"] = proxy_cpu / wall
    pc, lc = f"cpu{proxy_core}", f"cpu{load_core}"
    ours = proxy_cpu if target.core == proxy_core and target.workers == 1 else 0.0
    result["proxy_core_others_util"] = max(0.0, (busy1[pc] - busy0[pc]) - ours) / wall if pc in busy1 else None
    result["load_core_util"] = (busy1[lc] - busy0[lc]) / wall if lc in busy1 else None
    if target.admin_port:
        after = decision_counts(target.admin_port, target.workers)
        result["decisions"] = {
            k: int(v - before_dec.get(k, 0.0)) for k, v in after.items() if v - before_dec.get(k, 0.0) > 0
        }
        # an overloaded guard never finishes requests whose client gave up: charge the ones it handled
        handled = sum(result["decisions"].values())
        n = min(n, handled) if handled else n
    result["requests_charged"] = n
    result["cpu_us_per_req"] = cpu_all / n * 1e6 if n else None
    return result


def _wrk_latency(text: str, pct: str) -> float | None:
    m = re.search(rf"^\s+{pct}%\s+([0-9.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures wrk prints: requests, req/s, non-2xx/3xx, socket errors, latency percentiles."""
    req = re.search(r"^\s*(\d+) requests in ([0-9.]+)(\w+),", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests": int(req.group(1)) if req else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
        "p50_ms": _wrk_latency(text, "50"),
        "p99_ms": _wrk_latency(text, "99"),
    }


def run_wrk(
    target: Target,
    *,
    seconds: float,
    conns: int,
    load_core: int,
    proxy_core: int,
    quiet: Sequence[int] = (),
    offset: int = 0,
) -> dict[str, Any]:
    """Closed loop: ``conns`` keep-alive connections, one wrk thread, as fast as the target answers.

    ``offset``: where in the request pool's sequence to start, so that each session keeps walking
    through new rows across runs instead of replaying the same ones (replays look like probing).
    """
    argv = [
        "taskset",
        "-c",
        str(load_core),
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(target.lua),
        f"http://127.0.0.1:{target.port}",
    ]

    def run() -> dict[str, Any]:
        env = {**os.environ, "BENCH_OFFSET": str(offset)}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed against {target.name}: {done.stderr.strip()}")
        return parse_wrk(done.stdout)

    return _timed(target, load_core, proxy_core, run, lambda r: int(r["requests"]), quiet)


def run_open_loop(
    target: Target,
    *,
    rate: float,
    seconds: float,
    warmup: float,
    load_core: int,
    proxy_core: int,
    quiet: Sequence[int] = (),
    offset: int = 0,
) -> dict[str, Any]:
    """Open loop at ``rate`` req/s for ``seconds`` (+ warm-up), latency from each scheduled send time."""
    argv = [
        "taskset",
        "-c",
        str(load_core),
        sys.executable,
        str(LOADGEN),
        "--port",
        str(target.port),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{seconds + warmup:g}",
        "--warmup",
        f"{warmup:g}",
        "--requests",
        str(target.spec),
        "--offset",
        str(offset),
    ]

    def run() -> dict[str, Any]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed against {target.name}: {done.stderr.strip()[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    return _timed(target, load_core, proxy_core, run, lambda r: int(r["rate"] * (seconds + warmup)), quiet)
