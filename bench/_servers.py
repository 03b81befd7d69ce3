"""Processes for bench/proxy.py: nginx stub upstream, nginx reference proxy, the aiohttp floor, guards.

Each process is started through ``taskset`` (which execs the command, so the pid we hold is the server
itself), on loopback ports picked free, and stopped by that pid when the benchmark ends, also on
Ctrl-C. CPU time per process comes from ``/proc/<pid>/stat`` (utime + stime, all threads).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

NGINX_DIR = Path(__file__).resolve().parent / "nginx"
_TICK = os.sysconf("SC_CLK_TCK")
_REQUESTS_LINE = re.compile(r"^inference_guard_requests_total\{([^}]*)\}\s+([0-9.eE+-]+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')

INSTALL_HINT = {
    "nginx": "apt-get install -y nginx   (stub upstream and reference proxy)",
    "wrk": "apt-get install -y wrk     (closed-loop throughput)",
    "taskset": "apt-get install -y util-linux   (core pinning)",
}


def missing_tools() -> list[str]:
    """One line per required tool that is not on PATH, saying how to install it."""
    return [
        f"{tool}: not found; install with: {hint}" for tool, hint in INSTALL_HINT.items() if shutil.which(tool) is None
    ]


def free_port() -> int:
    """A loopback port free right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants alive now (a supervisor and its workers)."""
    total = cpu_seconds(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return total
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                children = [int(c) for c in fh.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                total += tree_cpu_seconds(child)
            except OSError:  # exited meanwhile
                continue
    return total


def redis_available(port: int = 6379) -> bool:
    """Whether a Redis server answers PING on the loopback port (for the GUARD_WORKERS configurations)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def delete_redis_prefix(prefix: str, port: int = 6379) -> None:
    """Delete the bench's own keys (SCAN + DEL through redis-cli; never FLUSH a shared server)."""
    if shutil.which("redis-cli") is None:
        return
    keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}*"],
                          capture_output=True, text=True, timeout=60, check=False).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-p", str(port), "DEL", *keys[i : i + 500]], capture_output=True, timeout=60,
                       check=False)


def render(template: str, out: Path, values: Mapping[str, str]) -> Path:
    """Fill ``@NAME@`` placeholders of bench/nginx/<template> and write the result to ``out``."""
    text = (NGINX_DIR / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    if re.search(r"@[A-Z_]+@", re.sub(r"(?m)^\s*#.*$", "", text)):
        raise ValueError(f"{template}: unfilled placeholder")
    out.write_text(text)
    return out


class Fleet:
    """Owns the benchmark's processes; stops each by its own pid on exit, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Fleet:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], core: int | str, env: Mapping[str, str] | None = None) -> int:
        log = open(self.workdir / f"{name}.stderr.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=dict(env) if env else None,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc.pid

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stderr_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.stderr.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if not name.startswith("nginx") else signal.SIGQUIT)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    # -- the servers ---------------------------------------------------------------------------------

    def nginx(self, name: str, template: str, core: int, values: Mapping[str, str]) -> int:
        """Start nginx (one worker, no master) from a template; returns once it accepts connections."""
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        conf = render(template, self.workdir / f"{name}.conf", {"DIR": str(self.workdir), **values})
        pid = self.start(
            name,
            ["nginx", "-p", str(self.workdir), "-e", str(self.workdir / f"{name}.error.log"), "-c", str(conf)],
            core,
        )
        wait_port(int(values["PORT"]), lambda: self.alive(name), name, self)
        return pid

    def floor(self, name: str, core: int, *, port: int, upstream_port: int, loop: str = "asyncio",
              client: str = "aiohttp") -> int:
        """Start the bare aiohttp reverse proxy (``_floor.py``) on ``loop`` (asyncio or uvloop) with ``client``
        (aiohttp or lean) to the upstream; returns once it accepts connections."""
        floor = str(Path(__file__).resolve().parent / "_floor.py")
        pid = self.start(name, [sys.executable, floor, "--port", str(port), "--upstream",
                                f"http://127.0.0.1:{upstream_port}", "--loop", loop, "--client", client], core)
        wait_port(port, lambda: self.alive(name), name, self)
        return pid

    def guard(
        self,
        name: str,
        core: int | str,
        *,
        port: int,
        admin_port: int,
        upstream_port: int,
        policy: str | None,
        profile: str | None,
        sample_allow: float,
        workers: int = 1,
        redis_url: str | None = None,
        api_keys: Sequence[str] = (),
        source_tree: Path | None = None,
    ) -> int:
        """Start ``guard-agent run`` with stdout (decision events) to /dev/null; returns once /readyz is 200 (on
        every worker's admin port: worker k serves admin_port + k). ``source_tree``: import guard_agent and detectors
        from that tree instead (PYTHONPATH), to measure another revision beside this one."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
        env.update(
            {
                "GUARD_LISTEN": f"127.0.0.1:{port}",
                "GUARD_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
                "GUARD_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
                "GUARD_LOG_SAMPLE_ALLOW": str(sample_allow),
                "GUARD_HMAC_KEY": secrets.token_hex(32),
            }
        )
        if policy:
            env["GUARD_POLICY"] = policy
        if profile:
            env["GUARD_PROFILE"] = profile
        if redis_url:
            env["GUARD_REDIS_URL"] = redis_url
        if api_keys:  # verified keys: an unverified one also counts against its client address's session (one
            # for all the bench's traffic from 127.0.0.1, which the rate limit would then throttle)
            keys = self.workdir / f"{name}.api-keys.json"
            keys.write_text(json.dumps({"keys": [{"name": f"k{i}", "key": k} for i, k in enumerate(api_keys)]}))
            env["GUARD_API_KEYS_FILE"] = str(keys)
        env["GUARD_WORKERS"] = str(workers)
        if source_tree is not None:
            env["PYTHONPATH"] = str(source_tree.resolve())
        pid = self.start(name, [guard_agent_path(), "run"], core, env)
        for k in range(workers):
            wait_http(f"http://127.0.0.1:{admin_port + k}/readyz", lambda: self.alive(name), name, self)
        return pid


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def guard_agent_path() -> str:
    """The guard-agent script of this interpreter's environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "guard-agent"
    found = str(local) if local.exists() else shutil.which("guard-agent")
    if not found:
        raise SystemExit("guard-agent not found: install the project (pip install -e .) into this environment")
    return found


def wait_port(port: int, alive: object, name: str, fleet: Fleet, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise RuntimeError(f"{name} exited at start:\n{fleet.stderr_tail(name)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout}s")


def wait_http(url: str, alive: object, name: str, fleet: Fleet, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise RuntimeError(f"{name} exited at start:\n{fleet.stderr_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name}: {url} not ready within {timeout}s:\n{fleet.stderr_tail(name)}")


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout}s")


def decision_counts(admin_port: int, workers: int = 1) -> dict[str, float]:
    """``inference_guard_requests_total`` summed by ``action/status`` over the workers (to diff before/after)."""
    text = ""
    for k in range(workers):
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port + k}/metrics", timeout=5) as resp:
            text += resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _REQUESTS_LINE.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group(1)))
            key = f"{labels.get('action', '?')}/{labels.get('status', '?')}"
            out[key] = out.get(key, 0.0) + float(m.group(2))
    return out
