"""Loopback servers for tests: free ports, an aiohttp app served for a ``with`` block, waiting for readiness."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServePost = Callable[[str, Handler], Awaitable[str]]
"""The ``serve_post`` fixture: ``await serve_post(path, handler)`` -> the stub's base URL."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (tests bind it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive TCP ports all free on 127.0.0.1 right now (``GUARD_WORKERS`` puts
    worker k's admin listener on the admin port + k)."""
    for _ in range(200):
        first = free_port()
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free ports on 127.0.0.1")


@asynccontextmanager
async def serve_app(app: web.Application, *, port: int | None = None, **runner: Any) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 (a free port unless ``port`` is given); yields its base URL, cleaned up after.

    Unlike pytest-aiohttp's ``aiohttp_server`` this keeps aiohttp's defaults (a handler is not cancelled when its
    client disconnects), as the hand-written runners it replaced did; stubs that count in-flight requests see
    every handler run to its end.
    """
    app_runner = web.AppRunner(app, access_log=None, **runner)
    await app_runner.setup()
    port = free_port() if port is None else port
    try:
        await web.TCPSite(app_runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await app_runner.cleanup()


async def wait_http_ready(url: str, alive: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200, failing as soon as ``alive()`` says the process behind it exited."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert alive(), f"the process exited before {url} was ready"
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


def spawn_guard(env: dict[str, str], out_path: Path, err_path: Path) -> subprocess.Popen[bytes]:
    """`guard-agent run` with stdout (the events) and stderr in files, so no pipe can fill and block it."""
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "guard_agent.cli", "run"], env=env, stdout=out, stderr=err)
