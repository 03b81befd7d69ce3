"""Upstream faults caused for real (refused, reset, silent, garbage, short body): JSON 502/504 in time, no leaks."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests._support.servers import serve_app
from tests.conftest import free_port

BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1.0, 2.0, 3.0, 4.0]}]})
HEADERS = {"Content-Type": "application/json"}


@dataclass
class BadServer:
    url: str
    open: int = 0
    accepted: int = 0


async def _read_request(reader: asyncio.StreamReader) -> bool:
    """Consume one request (head + Content-Length body); False when the client went away."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return False
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    try:
        await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    return True


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
    writer.transport.abort()


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def reset_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await _read_request(reader):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
                     b'{"outputs": [{"name": "p", "da')
        await writer.drain()
        await asyncio.sleep(0.05)
    _reset(writer)


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await reader.read()  # until the guard gives up and closes
    writer.close()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await _read_request(reader):
        writer.write(b"\x00\xff\xfeNOT-HTTP garbage \x1b[31m\r\n\r\n" * 4)
        await writer.drain()
    writer.close()


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await _read_request(reader):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"out")
        await writer.drain()
    writer.close()


@pytest.fixture
async def bad_server() -> AsyncIterator[Callable[[Behaviour], Awaitable[BadServer]]]:
    """Start raw TCP servers with a given misbehaviour; each counts its open connections."""
    servers: list[asyncio.Server] = []

    async def start(behaviour: Behaviour) -> BadServer:
        port = free_port()
        info = BadServer(url=f"http://127.0.0.1:{port}")

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            info.open += 1
            info.accepted += 1
            try:
                await behaviour(reader, writer)
            except (ConnectionError, OSError):
                pass
            finally:
                info.open -= 1

        servers.append(await asyncio.start_server(handler, "127.0.0.1", port))
        return info

    yield start
    for s in servers:
        s.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def post(http: aiohttp.ClientSession, url: str, path: str = "/v2/models/m/infer", method: str = "POST",
               rid: str | None = None) -> tuple[int, dict[str, object], float]:
    t0 = time.monotonic()
    headers = {**HEADERS, **({"X-Request-Id": rid} if rid else {})}
    async with http.request(method, url + path, data=BODY if method == "POST" else None, headers=headers) as r:
        doc = await r.json(content_type=None)
        return r.status, doc, time.monotonic() - t0


class TestUpstreamFaults:
    async def test_refused(self, start_guard) -> None:
        """Nothing listening upstream: 502 with a JSON error, at once; readiness reports the upstream down."""
        guard = await start_guard(f"http://127.0.0.1:{free_port()}", wait_ready=False)
        async with aiohttp.ClientSession() as http:
            status, doc, took = await post(http, guard.url, rid="refused")
            assert status == 502 and doc["error"]["code"] == "upstream_unavailable"  # type: ignore[index]
            assert doc["error"]["request_id"] == "refused"  # type: ignore[index]
            assert took < 2.0
            async with http.get(guard.admin_url + "/readyz") as r:
                assert r.status == 503 and (await r.json())["checks"]["upstream"] is False
        (event,) = guard.events_for("refused")
        assert event["http"]["response"]["status_code"] == 502 and event["event"]["outcome"] == "failure"

    @pytest.mark.parametrize("behaviour", [reset_mid_response, garbage, short_body], ids=["reset", "garbage", "short"])
    async def test_broken_answers_give_502(self, bad_server, start_guard, behaviour: Behaviour) -> None:
        """A reset mid-response, non-HTTP bytes or a truncated body give 502 JSON on inference and passthrough
        routes, and 40 such requests leak no file descriptors."""
        server = await bad_server(behaviour)
        guard = await start_guard(server.url, read_timeout=2.0)
        async with aiohttp.ClientSession() as http:
            status, doc, took = await post(http, guard.url)
            assert status == 502 and doc["error"]["code"] == "upstream_unavailable"  # type: ignore[index]
            assert took < 2.0
            try:
                async with http.get(guard.url + "/v2/health/ready") as r:
                    passthrough = r.status
                    await r.read()
            except aiohttp.ClientPayloadError:
                passthrough = -1  # headers were already sent; the guard cut the body rather than end it cleanly
            assert passthrough in (502, -1)
            before = open_fds()
            results = await asyncio.gather(*(post(http, guard.url) for _ in range(40)))
            assert {r[0] for r in results} == {502}
        await asyncio.sleep(0.3)
        assert open_fds() <= before + 2
        assert server.open == 0

    async def test_too_slow_gives_504_within_the_timeout(self, bad_server, start_guard) -> None:
        """A model that never answers gives 504 JSON after read_timeout, and the guard closes its connection."""
        server = await bad_server(never_answers)
        guard = await start_guard(server.url, read_timeout=1.0)
        async with aiohttp.ClientSession() as http:
            before = open_fds()
            results = await asyncio.gather(*(post(http, guard.url) for _ in range(10)))
        for status, doc, took in results:
            assert status == 504 and doc["error"]["code"] == "upstream_timeout"  # type: ignore[index]
            assert 0.9 < took < 2.5
        await asyncio.sleep(0.3)
        assert server.open == 0  # every upstream connection was closed, none left hanging
        assert open_fds() <= before + 2
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_upstream_errors_total", {"kind": "timeout"}) == 10

    async def test_recovers_when_the_model_returns(self, start_guard) -> None:
        """After the model comes back on the same port, requests succeed again without a guard restart."""
        from aiohttp import web

        port = free_port()
        guard = await start_guard(f"http://127.0.0.1:{port}", wait_ready=False)

        async def infer(_: web.Request) -> web.Response:
            return web.json_response({"outputs": [{"name": "p", "shape": [1, 2], "datatype": "FP64",
                                                   "data": [0.1, 0.9]}]})

        app = web.Application()
        app.router.add_post("/v2/models/m/infer", infer)
        async with aiohttp.ClientSession() as http:
            assert (await post(http, guard.url))[0] == 502
            async with serve_app(app, port=port):
                assert (await post(http, guard.url))[0] == 200
