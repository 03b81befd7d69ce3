"""Serve an aiohttp app on a loopback port for the length of a ``with`` block (a model stub, a collector)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import free_port


@asynccontextmanager
async def serve_app(app: web.Application, *, port: int | None = None, **runner: Any) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 (a free port unless ``port`` is given); yields its base URL, cleaned up after.

    Unlike pytest-aiohttp's ``aiohttp_server`` this keeps aiohttp's defaults (no handler cancellation on client
    disconnect), which the concurrency and drain tests rely on.
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
