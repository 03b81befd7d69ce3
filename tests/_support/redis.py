"""Redis for the tests: raw RESP commands, key clean-up and our own ``redis-server`` processes.

The shared server on 127.0.0.1:6379 is only ever touched under a test's own key prefix; tests that need to
stop or pause Redis start a ``RedisServer`` of their own.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests._support.servers import free_port


def redis_cmd(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One RESP command over a raw socket (no client library, no pool): for setup and checks."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(65536)


def delete_prefix(port: int, prefix: str) -> int:
    """Delete every key under ``prefix`` on the server (SCAN + DEL through redis-cli; never FLUSH)."""
    keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}*"],
                          capture_output=True, text=True, timeout=10, check=True).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-p", str(port), "DEL", *keys[i:i + 500]], capture_output=True,
                       timeout=10, check=True)
    return len(keys)


def keys_under(port: int, prefix: str) -> list[str]:
    return subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}*"],
                          capture_output=True, text=True, timeout=10, check=True).stdout.split()


class RedisServer:
    """Our own ``redis-server`` on a free port (no persistence), stoppable and restartable on that port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis_cmd(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
