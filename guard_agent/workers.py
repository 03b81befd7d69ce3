"""``GUARD_WORKERS=N``: N guard processes on one port (SO_REUSEPORT), so the guard can use N cores.

The kernel spreads new connections over the workers, so one client's requests land on several of them:
per-session evidence (trackers, rate limit, block cool-down) must live in Redis, which ``settings`` enforces
(N > 1 without ``redis_url`` is refused at start). Each worker is a full guard with its own event loop,
metrics and upstream pool; worker k serves its admin listener on the admin port + k (worker 0 on the
configured one), so Prometheus scrapes every worker and a counter never jumps between processes.

This process only supervises: it starts the workers (``python -m guard_agent.workers``, the settings as JSON
on stdin, so secrets never appear in an argument list or the environment), forwards SIGTERM/SIGINT/SIGHUP,
and when one worker exits on its own it stops the others and exits non-zero (the orchestrator restarts the
pod: a guard serving with fewer workers than configured would hide the fault). It also relays the workers'
stdout (the decision events) in whole lines: a worker writes its events in batches through a buffered
stream, and two processes writing one pipe directly could interleave inside a line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

import orjson

from guard_agent.settings import Settings, load_settings, parse_hostport

__all__ = ["one_native_thread", "run_workers", "worker_settings"]

_POLL_SECONDS = 0.2


def one_native_thread() -> None:
    """Limit BLAS/OpenMP pools to one thread in this process, for good.

    The guard scores on its event loop thread; a multi-threaded BLAS only adds threads that spin against the
    loop (and against the other workers, the model server and the pod's CPU limit). On a shared 2-core machine a
    32-row ``Profile.score`` took 9.7 ms of CPU with OpenBLAS's default threads and 0.8 ms with one
    (``bench/README.md``); one row never used the pool. Parallelism is ``GUARD_WORKERS``' job.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: the same guard port, its own admin port (the configured one + index)."""
    host, port = parse_hostport(settings.admin_listen)
    shown = f"[{host}]" if ":" in host else host
    return dataclasses.replace(settings, admin_listen=f"{shown}:{port + index}")


def _start(settings: Settings, index: int, out_lock: threading.Lock) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "guard_agent.workers"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    threading.Thread(target=_relay_lines, args=(proc.stdout.fileno(), out_lock), daemon=True,
                     name=f"worker-{index}-stdout").start()
    proc.stdin.write(orjson.dumps(dataclasses.asdict(worker_settings(settings, index))))
    proc.stdin.close()
    return proc


def _relay_lines(fd: int, lock: threading.Lock, out: int = 1) -> None:
    """Copy ``fd`` to ``out`` (this process's stdout) in whole lines until EOF, one writer at a time."""
    rest = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        rest += chunk
        cut = rest.rfind(b"\n") + 1
        if cut:
            with lock:
                _write_all(out, rest[:cut])
            rest = rest[cut:]
    if rest:
        with lock:
            _write_all(out, rest + b"\n")
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_workers(settings: Settings) -> int:
    """Start ``settings.workers`` workers and supervise them until they all exit; their worst exit code."""
    out_lock = threading.Lock()
    procs = [_start(settings, i, out_lock) for i in range(settings.workers)]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while any(proc.poll() is None for proc in procs):
        if not stopping and any(proc.poll() is not None for proc in procs):
            print("guard-agent run: a worker exited; stopping the others", file=sys.stderr)
            forward(signal.SIGTERM, None)
        time.sleep(_POLL_SECONDS)
    codes = [proc.returncode for proc in procs]
    return max(codes) if stopping else max(1, *codes)


def _worker_main() -> int:
    """One worker: settings from stdin (written by ``run_workers``), then the guard until SIGTERM."""
    from guard_agent.server import serve

    settings = load_settings(None, env={}, flags=orjson.loads(sys.stdin.buffer.read()))
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(_worker_main())
