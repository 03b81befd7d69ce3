"""Proxy benchmark: what the guard costs in front of a cheap model server.

Configurations, all on loopback, against an nginx stub upstream answering fixed v2 JSON bodies:

    direct        client -> stub upstream
    nginx         client -> nginx proxy_pass (1 worker, upstream keepalive) -> stub
    floor         client -> a bare aiohttp reverse proxy (bench/_floor.py: the guard's HTTP stack, no guard logic)
    floor-lean    the floor with a minimal keep-alive upstream client instead of aiohttp's (what aiohttp's client
                  costs per request); floor-uvloop: the floor on uvloop (only when uvloop is installed)
    guard-off     client -> guard-agent, policy without rules or rate limit, no profile -> stub
    guard-on      client -> guard-agent, default policy + a profile fitted on digits -> stub
                  (every detector and the session trackers run)
  extras (not with --quick):
    guard-on-monitor            guard-on in `mode: monitor`: every request takes the full path (score,
                                forward, track), since nothing is refused
    guard-on-monitor-sample0.01 the same with GUARD_LOG_SAMPLE_ALLOW=0.01 (default 1: every allow logged)
  with Redis on 127.0.0.1:6379 (--no-workers to leave them out):
    guard-on-redis              guard-on with its sessions in Redis, 1 worker (on the proxy core)
    guard-on-2workers           the same with GUARD_WORKERS=2 on both cores (one shared with the load: on a
                                2-core machine this shows the cost of a second worker, not its scaling)
  with --single-key:
    guard-on-1key               guard-on, all traffic from one API key

The proxy under test is pinned to core 0 (taskset -c 0); the load generators and the stub upstream to
core 1. Each repeat runs every configuration in turn (rotated order): closed-loop wrk throughput, then
the open-loop generator at 500 and 1000 req/s (latency from the scheduled send time). CPU per request
comes from /proc/<pid>/stat. Decision events go to /dev/null.

    python bench/proxy.py            # full: 3 repeats, ~10 minutes while the guard saturates
    python bench/proxy.py --quick    # 2 s runs, no extras: ~3-5 minutes
    python bench/proxy.py --profile 15   # also py-spy the guard (all checks on) at 1000 req/s
    python bench/proxy.py --quick --profile 15 --profile-config guard-off   # ... or the guard without rules
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report as report
from _measure import Target, idle_cpu, run_open_loop, run_wrk
from _servers import Fleet, delete_redis_prefix, free_port, guard_agent_path, missing_tools, redis_available
from _workload import (
    CHECKS_OFF_POLICY,
    LABEL_HEADER,
    digits_split,
    fit_profile,
    lua_script,
    nginx_answer_map,
    request_spec,
    stub_answer,
    write_spec,
)

PROXY_CORE, LOAD_CORE = 0, 1
SANITY_KEYS = tuple(f"bench-sanity-key-{i:04d}" for i in range(10))
RATES = (500, 1000)  # fixed open-loop rates; --rates adds others (e.g. one the guard can sustain)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="guard vs nginx vs direct: throughput, latency, CPU per request")
    p.add_argument("--quick", action="store_true", help="2 s runs, no extra configurations (~3-5 min)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration (>= 3)")
    p.add_argument("--seconds", type=float, default=None, help="length of each run (default 5, quick 2)")
    p.add_argument(
        "--rates",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=RATES,
        help="open-loop rates in req/s, comma-separated (default 500,1000)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    p.add_argument("--keys", type=int, default=256, help="API keys in the pool (sessions)")
    p.add_argument("--single-key", action="store_true", help="also run guard-on with all traffic from one API key")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the guard (all checks on) at 1000 req/s for SECONDS and print hot spots",
    )
    p.add_argument(
        "--profile-config",
        default=None,
        metavar="NAME",
        help="the configuration --profile spies on, e.g. guard-off (default guard-on-monitor, with --quick guard-on)",
    )
    p.add_argument(
        "--workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also guard-on with Redis sessions, 1 vs 2 workers (GUARD_WORKERS; needs Redis on 127.0.0.1:6379)",
    )
    p.add_argument(
        "--only",
        type=lambda v: tuple(x for x in v.split(",") if x),
        default=None,
        metavar="NAMES",
        help="measure only these configurations, comma-separated (e.g. floor,guard-off,guard-on)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="TREE",
        help="also run guard-off and guard-on from another source tree (PYTHONPATH=TREE), as guard-off@base and "
        "guard-on@base: before/after in one run, under the same load on the machine",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every run's raw figures here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    return p.parse_args(argv)


def _header(args: argparse.Namespace, seconds: float) -> list[str]:
    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False, cwd="/")
        except OSError:
            return "?"
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    where = version([sys.executable, "-c", "import guard_agent; print(guard_agent.__file__)"])
    src = Path(where).resolve().parent.parent
    rev = version(["git", "-C", str(src), "describe", "--always", "--dirty"]) if (src / ".git").exists() else "-"
    return [
        f"guard_agent imported from {where} (git {rev}; set PYTHONPATH to benchmark another tree)",
        f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {platform.platform()}; "
        f"{os.cpu_count()} CPUs ({cpu}); python {platform.python_version()}",
        f"{version(['nginx', '-v'])}; {version(['wrk', '-v'])}; {version([guard_agent_path(), '--version'])}",
        f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]}; python speed probe on core "
        f"{PROXY_CORE}: {python_speed(PROXY_CORE):.3f} s for 3M loop iterations (lower = faster/less contended)",
        f"runs: {seconds:g} s each, {args.repeats} interleaved repeats, wrk -t1 -c{args.connections}, "
        f"{args.keys} API keys, proxy on core {PROXY_CORE}, load + stub upstream on core {LOAD_CORE}",
    ]


def python_speed(core: int) -> float:
    """Seconds for a fixed pure-Python loop pinned to ``core``: how fast (and how contended) the core is."""
    code = "import time\nt=time.perf_counter()\ns=0\nfor i in range(3_000_000): s+=i\nprint(time.perf_counter()-t)"
    done = subprocess.run(
        ["taskset", "-c", str(core), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(done.stdout.strip())


def _start(fleet: Fleet, work: Path, args: argparse.Namespace, extras: bool) -> dict[str, Target]:
    """Data, profile, request pools, then every server; returns the targets by configuration name."""
    x_ref, y_ref, x_test, y_test = digits_split()
    profile = fit_profile(guard_agent_path(), work, x_ref, y_ref)
    off_policy = work / "policy-off.yaml"
    off_policy.write_text(CHECKS_OFF_POLICY)
    monitor_policy = work / "policy-monitor.yaml"
    monitor_policy.write_text(_monitor_policy())
    pool = request_spec(x_test, y_test, args.keys)
    spec, lua = write_spec(pool, work / "requests.json"), lua_script(pool, work / "requests.lua")
    single = request_spec(x_test, y_test, 1)
    spec1, lua1 = write_spec(single, work / "requests-1key.json"), lua_script(single, work / "requests-1key.lua")

    up = free_port()
    answers = {"PORT": str(up), "DEFAULT_ANSWER": stub_answer(0), "ANSWERS": nginx_answer_map()}
    up_pid = fleet.nginx("nginx-upstream", "upstream.conf.template", LOAD_CORE, answers)
    targets = {"direct": Target("direct", up, up_pid, spec, lua, LOAD_CORE)}
    ng = free_port()
    ng_pid = fleet.nginx("nginx-proxy", "proxy.conf.template", PROXY_CORE, {"PORT": str(ng), "UPSTREAM_PORT": str(up)})
    targets["nginx"] = Target("nginx", ng, ng_pid, spec, lua, PROXY_CORE)
    fl = free_port()
    targets["floor"] = Target("floor", fl, fleet.floor("floor", PROXY_CORE, port=fl, upstream_port=up), spec, lua,
                              PROXY_CORE)
    fl = free_port()
    targets["floor-lean"] = Target(
        "floor-lean", fl, fleet.floor("floor-lean", PROXY_CORE, port=fl, upstream_port=up, client="lean"), spec, lua,
        PROXY_CORE)
    if _uvloop_installed():
        fu = free_port()
        targets["floor-uvloop"] = Target(
            "floor-uvloop", fu, fleet.floor("floor-uvloop", PROXY_CORE, port=fu, upstream_port=up, loop="uvloop"),
            spec, lua, PROXY_CORE)
    guards: list[tuple[str, str | None, str | None, float, Path | None]] = [
        ("guard-off", str(off_policy), None, 1.0, None),
        ("guard-on", None, str(profile), 1.0, None),
    ]
    if args.baseline is not None:
        guards.append(("guard-off@base", str(off_policy), None, 1.0, args.baseline))
        guards.append(("guard-on@base", None, str(profile), 1.0, args.baseline))
    if extras:
        guards.append(("guard-on-monitor", str(monitor_policy), str(profile), 1.0, None))
        guards.append(("guard-on-monitor-sample0.01", str(monitor_policy), str(profile), 0.01, None))
    keys = [*pool["keys"], *SANITY_KEYS]
    for name, policy, prof, sample, tree in guards:
        if not _wanted(args, name):
            continue
        port, admin = free_port(), free_port()
        pid = fleet.guard(
            name,
            PROXY_CORE,
            port=port,
            admin_port=admin,
            upstream_port=up,
            policy=policy,
            profile=prof,
            sample_allow=sample,
            api_keys=keys,
            source_tree=tree,
        )
        targets[name] = Target(name, port, pid, spec, lua, PROXY_CORE, admin)
    if args.workers:
        _start_workers(fleet, targets, args, up, str(profile), spec, lua, keys)
    if args.single_key and "guard-on" in targets:
        on = targets["guard-on"]
        targets["guard-on-1key"] = Target("guard-on-1key", on.port, on.pid, spec1, lua1, PROXY_CORE, on.admin_port)
    return {name: t for name, t in targets.items() if _wanted(args, name)}


def _uvloop_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def _wanted(args: argparse.Namespace, name: str) -> bool:
    """Whether ``--only`` leaves this configuration in (``direct`` always stays: added latency is against it)."""
    return args.only is None or name == "direct" or name in args.only


def _start_workers(fleet: Fleet, targets: dict[str, Target], args: argparse.Namespace, upstream: int,
                   profile: str, spec: Path, lua: Path, keys: list[str]) -> None:
    """guard-on with its sessions in Redis: 1 worker on the proxy core, and 2 workers (GUARD_WORKERS=2) on both
    cores (the second shares the load core with wrk and the stub: on 2 cores this cannot show scaling)."""
    if not redis_available():
        print("GUARD_WORKERS configurations skipped: no Redis on 127.0.0.1:6379 (apt-get install redis-server)")
        return
    redis_url = f"redis://127.0.0.1:6379/0?key_prefix={args.redis_prefix}"
    for name, workers, cores in (("guard-on-redis", 1, str(PROXY_CORE)),
                                 ("guard-on-2workers", 2, f"{PROXY_CORE},{LOAD_CORE}")):
        if not _wanted(args, name):
            continue
        port, admin = free_port(), _free_port_run(workers)
        pid = fleet.guard(name, cores, port=port, admin_port=admin, upstream_port=upstream, policy=None,
                          profile=profile, sample_allow=1.0, workers=workers, redis_url=redis_url, api_keys=keys)
        targets[name] = Target(name, port, pid, spec, lua, PROXY_CORE, admin, workers)


def _free_port_run(n: int) -> int:
    """A port p with p .. p + n - 1 free right now (worker k's admin listener is on the admin port + k)."""
    import socket

    while True:
        first = free_port()
        try:
            for k in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + k))
        except OSError:
            continue
        return first


def _monitor_policy() -> str:
    """The default policy of the guard under test, switched to ``mode: monitor``."""
    code = "import guard_agent, pathlib; print(pathlib.Path(guard_agent.__file__).parent / 'default_policy.yaml')"
    where = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd="/"
    ).stdout.strip()
    text = Path(where).read_text()
    lines = text.splitlines(keepends=True)
    modes = [i for i, ln in enumerate(lines) if ln.startswith("mode:")]
    if len(modes) != 1:
        raise SetupError(f"{where}: expected one top-level 'mode:' line to switch to monitor")
    lines[modes[0]] = "mode: monitor\n"
    return "".join(lines)


class SetupError(RuntimeError):
    """A server did not start or did not answer as expected: the figures would mean nothing."""


def _sanity(targets: dict[str, Target]) -> list[str]:
    """Per target, the stub's answer must come back byte-for-byte (the first of a few rows that is allowed:
    the guard may block a row as out-of-distribution, which is its right)."""
    import urllib.error
    import urllib.request

    pool = json.loads(next(iter(targets.values())).spec.read_text())
    lines = []
    for t in targets.values():
        seen = []
        for i in range(10):
            label = pool["headers"][i][LABEL_HEADER]
            req = urllib.request.Request(
                f"http://127.0.0.1:{t.port}{pool['path']}",
                data=pool["bodies"][i].encode(),
                headers={"Content-Type": "application/json", "X-API-Key": SANITY_KEYS[i], LABEL_HEADER: label},
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    body, status = resp.read(), resp.status
            except urllib.error.HTTPError as exc:
                body, status = exc.read(), exc.code
            seen.append(status)
            if status == 200:
                if body != stub_answer(int(label)).encode():
                    raise SetupError(f"{t.name}: 200 but the body differs from the stub's: {body[:300]!r}")
                break
        else:
            raise SetupError(f"{t.name}: no sanity request answered 200 (statuses {seen})")
        lines.append(f"{t.name}: statuses {seen}, stub body byte-identical")
    return lines


def _measure_all(targets: dict[str, Target], args: argparse.Namespace, seconds: float) -> list[dict[str, Any]]:
    names = list(targets)
    quiet = sorted({t.pid for t in targets.values()})  # every server idle before each run starts
    # per (server, request pool): where the next run continues the sequence, so no session replays rows
    cursor: dict[tuple[int, str], int] = {}

    def wrk(t: Target, secs: float) -> dict[str, Any]:
        key = (t.pid, str(t.spec))
        res = run_wrk(
            t,
            seconds=secs,
            conns=args.connections,
            offset=cursor.get(key, 0),
            load_core=LOAD_CORE,
            proxy_core=PROXY_CORE,
            quiet=quiet,
        )
        cursor[key] = cursor.get(key, 0) + int(res["requests"]) + args.connections
        return res

    def open_loop(t: Target, rate: int) -> dict[str, Any]:
        key = (t.pid, str(t.spec))
        res = run_open_loop(
            t,
            rate=rate,
            seconds=seconds,
            warmup=0.5,
            offset=cursor.get(key, 0),
            load_core=LOAD_CORE,
            proxy_core=PROXY_CORE,
            quiet=quiet,
        )
        cursor[key] = cursor.get(key, 0) + int(rate * (seconds + 0.5))
        return res

    runs: list[dict[str, Any]] = []
    for t in targets.values():  # warm-up: connection pools, first-call costs; not recorded
        wrk(t, 1.0)
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            t = targets[name]
            runs.append({"config": name, "rep": rep, "kind": "wrk", **wrk(t, seconds)})
            for rate in args.rates:
                runs.append({"config": name, "rep": rep, "kind": f"open{rate}", **open_loop(t, rate)})
            last = runs[-(1 + len(args.rates)) :]
            print(
                f"  repeat {rep + 1}/{args.repeats} {name:<28} wrk {last[0]['rps']:8.0f} req/s  "
                + "  ".join(
                    f"@{r['kind'][4:]} p50 {report.fmt(r['p50_ms'], '.2f')} p99 "
                    f"{report.fmt(r['p99_ms'], '.2f')} ms {report.fmt(r['cpu_us_per_req'], '.0f')} us/req"
                    for r in last[1:]
                ),
                flush=True,
            )
    return runs


def _print_report(runs: list[dict[str, Any]], targets: dict[str, Target], rates: Sequence[int]) -> None:
    configs = list(targets)
    proxies = [c for c in configs if c != "direct"]
    guards = [c for c in configs if c.startswith("guard")]
    print("\n== results (median over repeats) ==")
    print("\n".join(report.main_table(runs, configs, rates)))
    print("\n== ratios ==")
    print("\n".join(report.ratio_lines(runs, proxies, rates)))
    print("\n== targets ==")
    print("\n".join(report.target_lines(runs, guards)))
    print("\n== guard decisions during the runs (from /metrics) ==")
    print("\n".join(report.decision_lines(runs, guards)))
    print("\n== open-loop generator check ==")
    print("\n".join(report.generator_lines(runs, rates)))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    args.redis_prefix = f"guard-proxybench-{os.getpid()}:"
    missing = missing_tools()
    if missing:
        print("bench/proxy.py needs:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("bench/proxy.py needs 2 usable CPUs (proxy on one, load on the other)", file=sys.stderr)
        return 2
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    extras = not args.quick
    work = Path(tempfile.mkdtemp(prefix="guard-proxybench-"))
    started = time.monotonic()
    print("\n".join(_header(args, seconds)), flush=True)
    try:
        with Fleet(work) as fleet:
            targets = _start(fleet, work, args, extras)
            spied = args.profile_config or ("guard-on-monitor" if "guard-on-monitor" in targets else "guard-on")
            if args.profile > 0 and spied not in targets:  # said before minutes of runs, not after
                raise SetupError(f"--profile-config {spied}: not one of {', '.join(targets)}")
            print("\n".join(_sanity(targets)), flush=True)
            idle = idle_cpu({n: t.pid for n, t in targets.items() if t.core == PROXY_CORE})
            print("idle CPU (3 s, no traffic): " + ", ".join(f"{n} {v:.1%}" for n, v in idle.items()), flush=True)
            runs = _measure_all(targets, args, seconds)
            _print_report(runs, targets, args.rates)
            if args.profile > 0:
                from _profile import profile_guard

                print(f"\n== py-spy: {spied} at 1000 req/s for {args.profile:g} s ==")
                print("\n".join(profile_guard(targets[spied], work, args.profile, LOAD_CORE)))
            if args.json:
                args.json.write_text(json.dumps(runs, indent=1))
    except KeyboardInterrupt:
        print("interrupted: processes stopped", file=sys.stderr)
        return 130
    except (SetupError, RuntimeError) as exc:
        print(f"bench/proxy.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workers:
            delete_redis_prefix(args.redis_prefix)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\ntotal {time.monotonic() - started:.0f} s; load average at end: "
        f"{Path('/proc/loadavg').read_text().split()[:3]}" + (f"; work dir {work}" if args.keep else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
