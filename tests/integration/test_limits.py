"""Hostile-input limits on a real guard over raw sockets: sizes, depth, batch, concurrency, slow clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

from tests._support.rawhttp import closed_within, exchange, port_of, read_response
from tests._support.servers import serve_app


@dataclass
class Upstream:
    url: str
    active: int = 0
    peak: int = 0
    calls: int = 0
    delay: float = 0.0
    seen: list[int] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A v2 model stub that answers one probability row per input row and records its peak concurrency."""
    up = Upstream(url="")

    async def infer(request: web.Request) -> web.Response:
        up.active += 1
        up.calls += 1
        up.peak = max(up.peak, up.active)
        try:
            doc = orjson.loads(await request.read())
            rows = int(doc["inputs"][0]["shape"][0])
            up.seen.append(int(doc["inputs"][0]["data"][0]))
            await asyncio.sleep(up.delay)
            return web.json_response({"model_name": "m", "outputs": [
                {"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64", "data": [0.5, 0.5] * rows}]})
        finally:
            up.active -= 1

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v2/models/m/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    async with serve_app(app) as url:
        up.url = url
        yield up


def body_for(rows: int = 1, first: float = 1.0, features: int = 4) -> bytes:
    data = [first] + [0.5] * (rows * features - 1)
    return orjson.dumps({"inputs": [{"name": "x", "shape": [rows, features], "datatype": "FP64", "data": data}]})


def request_bytes(body: bytes, *, path: str = "/v2/models/m/infer", extra: str = "") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


class TestSizes:
    async def test_body_too_large_by_length_and_by_chunks(self, upstream: Upstream, start_guard) -> None:
        """Bodies over max_body_bytes get 413 whether announced by Content-Length or streamed chunked."""
        guard = await start_guard(upstream.url, max_body_bytes=4096)
        port = port_of(guard.url)
        status, _, body = await exchange(port, request_bytes(body_for(rows=400)))
        assert status == 413 and orjson.loads(body)["error"]["code"] == "body_too_large"
        big = body_for(rows=400)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 1000]), big[i:i + 1000]) for i in range(0, len(big), 1000))
        head = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        status, _, _ = await exchange(port, head + chunks + b"0\r\n\r\n")
        assert status == 413
        assert upstream.calls == 0
        assert (await exchange(port, request_bytes(body_for())))[0] == 200

    async def test_headers_too_large(self, upstream: Upstream, start_guard) -> None:
        """Headers summing over max_header_bytes get 431; one header beyond the parser's line limit gets a 4xx."""
        guard = await start_guard(upstream.url, max_header_bytes=2048)
        port = port_of(guard.url)
        many = "".join(f"X-Pad-{i}: {'v' * 100}\r\n" for i in range(30))
        status, _, body = await exchange(port, request_bytes(body_for(), extra=many))
        assert status == 431 and orjson.loads(body)["error"]["code"] == "headers_too_large"
        status, _, _ = await exchange(port, request_bytes(body_for(), extra=f"X-Huge: {'v' * 20000}\r\n"))
        assert 400 <= status < 500
        assert upstream.calls == 0

    async def test_json_depth_and_batch_rows(self, upstream: Upstream, start_guard) -> None:
        """JSON nested beyond max_json_depth and batches beyond max_batch_rows get 400 and never reach the model."""
        guard = await start_guard(upstream.url, max_json_depth=16, max_batch_rows=8)
        port = port_of(guard.url)
        deep = b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": ' + b"[" * 64 + b"1" + \
            b"]" * 64 + b"}]}"
        status, _, body = await exchange(port, request_bytes(deep))
        assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_input"
        status, _, body = await exchange(port, request_bytes(body_for(rows=9)))
        assert status == 400 and "rows" in orjson.loads(body)["error"]["message"]
        assert upstream.calls == 0
        assert (await exchange(port, request_bytes(body_for(rows=8))))[0] == 200


class TestConcurrency:
    async def test_pipelined_requests_are_served_one_at_a_time(self, upstream: Upstream, start_guard) -> None:
        """Ten pipelined requests on one connection reach the model one at a time and are answered in order."""
        upstream.delay = 0.02
        guard = await start_guard(upstream.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        writer.write(b"".join(request_bytes(body_for(first=float(i)), extra=f"X-Request-Id: p{i}\r\n")
                              for i in range(10)))
        await writer.drain()
        ids = [(await read_response(reader))[1]["x-request-id"] for _ in range(10)]
        writer.close()
        assert ids == [f"p{i}" for i in range(10)]
        assert upstream.seen == list(range(10))
        assert upstream.peak == 1

    async def test_connection_cap(self, upstream: Upstream, start_guard, monkeypatch: pytest.MonkeyPatch) -> None:
        """Beyond the connection cap new connections get 503 and are closed; capacity returns when others close."""
        guard = await start_guard(upstream.url, max_connections=3)
        port = port_of(guard.url)
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await closed_within(reader, 5)
        writer.close()
        assert refused.startswith(b"HTTP/1.1 503") and b'"overloaded"' in refused
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_connections_refused_total", {"reason": "connections"}) == 1
        assert registry.get_sample_value("inference_guard_open_connections") == 3
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        assert (await exchange(port, request_bytes(body_for())))[0] == 200


class TestSlowClients:
    async def test_slow_body_cut_off(self, upstream: Upstream, start_guard) -> None:
        """A body dribbled slower than client_read_timeout gets 408 and the connection is closed."""
        guard = await start_guard(upstream.url, client_read_timeout=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        body = body_for()
        writer.write(request_bytes(body)[: -len(body) + 5])
        await writer.drain()
        started = time.monotonic()

        async def dribble() -> None:
            for byte in body[5:]:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.5)

        task = asyncio.create_task(dribble())
        try:
            status, headers, _ = await read_response(reader, timeout=5)
        finally:
            task.cancel()
        assert status == 408 and headers.get("connection") == "close"
        assert time.monotonic() - started < 3
        assert upstream.calls == 0

    async def test_slowloris_headers_cut_off(self, upstream: Upstream, start_guard,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """A request head dribbled byte by byte is answered 408 and closed after the header timeout, while a
        normal client on another connection is served meanwhile."""
        guard = await start_guard(upstream.url, header_read_timeout=1.0)
        port = port_of(guard.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: guard\r\nX-Padding: " + b"a" * 200

        async def dribble() -> None:
            for byte in head:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)

        started = time.monotonic()
        task = asyncio.create_task(dribble())
        assert (await exchange(port, request_bytes(body_for())))[0] == 200
        try:
            answer = await closed_within(reader, 4)
        finally:
            task.cancel()
        assert answer.startswith(b"HTTP/1.1 408")
        assert 0.9 < time.monotonic() - started < 3
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_connections_refused_total", {"reason": "slow_headers"}) == 1

    async def test_silent_connection_cut_off(self, upstream: Upstream, start_guard) -> None:
        """A connection that never sends a byte is answered 408 and closed after the header timeout too."""
        guard = await start_guard(upstream.url, header_read_timeout=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        started = time.monotonic()
        answer = await closed_within(reader, 4)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 3

    async def test_keepalive_connection_not_cut_between_requests(self, upstream: Upstream, start_guard,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """An idle keep-alive connection outlives the header timeout and serves its next request."""
        guard = await start_guard(upstream.url, header_read_timeout=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        data = request_bytes(body_for())
        writer.write(data[:20])  # a head in two parts, both well within the timeout
        await asyncio.sleep(0.1)
        writer.write(data[20:])
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(1.2)
        writer.write(data)
        assert (await read_response(reader))[0] == 200
        writer.close()
