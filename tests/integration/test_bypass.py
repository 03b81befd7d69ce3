"""Bypass attempts against a real guard: nothing reaches the model unscored or with bytes other than scored."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
from aiohttp import web

from tests._support.rawhttp import exchange, port_of, read_response
from tests._support.servers import serve_app

ROW = [0.5, 1.5, 2.5, 3.5]


@dataclass
class Recorder:
    url: str = ""
    calls: list[tuple[str, str, bytes]] = field(default_factory=list)

    def infer_calls(self) -> list[tuple[str, str, bytes]]:
        return [c for c in self.calls if c[1].endswith("/infer")]


@pytest.fixture
async def model() -> AsyncIterator[Recorder]:
    """A catch-all model stub: records every method, raw path and body it receives."""
    rec = Recorder()

    async def any_route(request: web.Request) -> web.Response:
        body = await request.read()
        rec.calls.append((request.method, request.raw_path, body))
        if request.raw_path.endswith("/infer") and body:
            try:
                rows = int(orjson.loads(body)["inputs"][0]["shape"][0])
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
                rows = 1
            return web.json_response({"model_name": "m", "outputs": [
                {"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64", "data": [0.5, 0.5] * rows}]})
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_route)
    async with serve_app(app) as url:
        rec.url = url
        yield rec


def good_body() -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW}]})


def raw(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n"
    if "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


class TestRoutes:
    @pytest.mark.parametrize(("method", "target"), [
        ("POST", "/v2/repository/models/m/unload"),
        ("POST", "/v2/repository/models/m/load"),
        ("POST", "/v2/models/m/versions/1/generate"),
        ("DELETE", "/v2/models/m"),
        ("PUT", "/v2/models/m/infer"),
        ("POST", "/admin/reload"),
        ("POST", "/metrics"),
        ("GET", "/v2/models/m/infer"),
    ])
    async def test_unlisted_routes_refused(self, model: Recorder, start_guard, method: str, target: str) -> None:
        """Routes outside the table get 403 (or 400/405) and never reach the model."""
        guard = await start_guard(model.url)
        status, _, body = await exchange(port_of(guard.url), raw(method, target, good_body()))
        assert status in (400, 403, 405), status
        assert orjson.loads(body)["error"]["code"]
        assert model.calls == []

    @pytest.mark.parametrize("target", [
        "/v2/models/m/infer/",
        "/v2/models/m/infer%2F",
        "/v2/models%2Fm/infer",
        "/v2/models/m/../m/infer",
        "/v2/models/./m/infer",
        "/v2/models/m/%2e%2e/m/infer",
        "//v2/models/m/infer",
        "/V2/models/m/infer",
        "/v2/models/m/INFER",
        "/v2/models/m/infer;x=1",
        "/v2/models/m/infer%00",
        "/v2/models/m%20/infer",
        "/v2/repository/models/m/unload%3F/../../../models/m/infer",
        "/v2/models/m/infer#frag",
        "http://evil.test/v2/repository/models/m/unload",
        "*",
    ])
    async def test_path_variants_refused(self, model: Recorder, start_guard, target: str) -> None:
        """Ambiguous spellings of an inference path are refused, not normalised and forwarded."""
        guard = await start_guard(model.url)
        status, _, _ = await exchange(port_of(guard.url), raw("POST", target, good_body()))
        assert status in (400, 403, 404), status
        assert model.calls == []

    async def test_canonical_route_is_scored_and_forwarded_verbatim(self, model: Recorder, start_guard) -> None:
        """The control case: the exact scored bytes reach the model, with a decision event."""
        guard = await start_guard(model.url)
        body = good_body()
        status, _, _ = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", body,
                                                              "X-Request-Id: ctl\r\n"))
        assert status == 200
        assert model.calls == [("POST", "/v2/models/m/infer", body)]
        (event,) = guard.events_for("ctl")
        assert event["event"]["action"] == "allow" and event["guard"]["rows"] == 1


class TestBodies:
    @pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity, gzip", "GZIP", "x-unknown"])
    async def test_content_encoding_refused(self, model: Recorder, start_guard, encoding: str) -> None:
        """Compressed or unknown encodings are refused (400): the guard never scores bytes it would not forward."""
        guard = await start_guard(model.url)
        body = gzip.compress(good_body())
        status, _, _ = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", body,
                                                              f"Content-Encoding: {encoding}\r\n"))
        assert status == 400
        assert model.calls == []

    async def test_chunked_body_scored_then_forwarded_as_scored(self, model: Recorder, start_guard) -> None:
        """A chunked body is reassembled, scored, and the model gets exactly those bytes."""
        guard = await start_guard(model.url)
        body = good_body()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
        status, _, _ = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", chunks + b"0\r\n\r\n",
                                                              "Transfer-Encoding: chunked\r\n"))
        assert status == 200
        assert [c[2] for c in model.infer_calls()] == [body]

    @pytest.mark.parametrize("extra", [
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
    ])
    async def test_framing_smuggling_refused(self, model: Recorder, start_guard, extra: str) -> None:
        """Conflicting or odd framing (CL+TE, TE lists, unknown TE) is refused before any scoring."""
        guard = await start_guard(model.url)
        body = good_body()
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        head = f"POST /v2/models/m/infer HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n{extra}\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        writer.write(head.encode() + framed)
        try:
            status, _, _ = await read_response(reader)
        except (ConnectionResetError, asyncio.IncompleteReadError):
            status = 0  # closed without an answer: also a refusal
        finally:
            writer.close()
        assert status in (0, 400, 501), status
        assert model.calls == []

    @pytest.mark.parametrize("body", [
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [9, 9, 9, 9], '
        b'"data": [0.5, 1.5, 2.5, 3.5]}]}',
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [0.5, 1.5, 2.5, 3.5]}], '
        b'"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [9, 9, 9, 9]}]}',
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [0.5, 1.5, 2.5, 3.5], '
        b'"d\\u0061ta": [9, 9, 9, 9]}]}',
    ])
    async def test_duplicate_keys_refused(self, model: Recorder, start_guard, body: bytes) -> None:
        """Duplicate JSON keys (also spelled with escapes) are refused: parsers disagree on which one wins."""
        guard = await start_guard(model.url)
        status, _, _ = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", body))
        assert status == 400
        assert model.calls == []

    async def test_binary_extension_parsed_or_refused(self, model: Recorder, start_guard) -> None:
        """The v2 binary-tensor extension is scored when well formed; a lying header length is refused."""
        guard = await start_guard(model.url)
        port = port_of(guard.url)
        tensor = np.asarray([ROW], dtype=np.float32).tobytes()
        header = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": len(tensor)}}]})
        body = header + tensor
        extra = f"Inference-Header-Content-Length: {len(header)}\r\nX-Request-Id: bin\r\n"
        status, _, _ = await exchange(port, raw("POST", "/v2/models/m/infer", body, extra))
        assert status == 200
        assert [c[2] for c in model.infer_calls()] == [body]
        assert guard.events_for("bin")[0]["guard"]["rows"] == 1
        for bad in (f"Inference-Header-Content-Length: {len(header) + 3}\r\n",
                    "Inference-Header-Content-Length: -1\r\n",
                    "Inference-Header-Content-Length: 0x10\r\n"):
            status, _, _ = await exchange(port, raw("POST", "/v2/models/m/infer", body, bad))
            assert status == 400, bad
        status, _, _ = await exchange(port, raw("POST", "/v2/models/m/infer", body))  # binary without the header
        assert status == 400
        assert len(model.infer_calls()) == 1

    async def test_passthrough_cannot_carry_a_body_to_inference(self, model: Recorder, start_guard) -> None:
        """A read-only route with a smuggled second request in its body forwards only that one GET."""
        guard = await start_guard(model.url)
        inner = raw("POST", "/v2/repository/models/m/unload", b"")
        status, _, _ = await exchange(port_of(guard.url), raw("GET", "/v2/health/ready", inner))
        assert status in (200, 400)
        assert all(c[1] == "/v2/health/ready" for c in model.calls)
