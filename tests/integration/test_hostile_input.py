"""Hostile and mistaken input sent as real bytes to a real guard over loopback.

Each test sends what an outside probe sent (raw sockets where a client library would not) and checks what reaches
the model, what the client gets and the one decision event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from tests._support.rawhttp import exchange, port_of, read_response
from tests._support.servers import serve_app
from tests.conftest import DigitsData

BEYOND_FLOAT32 = 3.4028236e38  # the next float64 above float32's largest value, after rounding to 8 digits


@dataclass
class Model:
    """A catch-all model stub that records the method, raw path, headers and body of everything it receives."""

    url: str = ""
    calls: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


def _answer(path: str, rows: int) -> web.Response:
    if path.endswith(":predict"):
        return web.json_response({"predictions": [[0.5, 0.5]] * rows})
    if path == "/invocations":
        return web.json_response({"predictions": [[0.5, 0.5]] * rows})
    return web.json_response({"model_name": "m", "outputs": [
        {"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64", "data": [0.5, 0.5] * rows}]})


@pytest.fixture
async def model() -> AsyncIterator[Model]:
    rec = Model()

    async def any_route(request: web.Request) -> web.Response:
        body = await request.read()
        rec.calls.append((request.method, request.raw_path, dict(request.headers), body))
        return _answer(request.path, 1) if request.method == "POST" else web.json_response({"ready": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_route)
    async with serve_app(app) as url:
        rec.url = url
        yield rec


def raw(method: str, target: str, body: bytes = b"", extra: str = "", *, content_type: str = "application/json",
        version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {target} {version}\r\nHost: guard\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    if not any(line.split(":")[0].lower() in ("transfer-encoding", "content-length") for line in extra.split("\r\n")):
        head += f"Content-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def _row_beyond(digits: DigitsData) -> list[float]:
    row = [float(v) for v in digits.X_test[0]]
    row[5] = BEYOND_FLOAT32
    return row


def _bodies(row: list[float]) -> dict[str, tuple[str, bytes, str]]:
    """The same row in every numeric protocol path: (target, body, extra headers)."""
    v2 = orjson.dumps({"inputs": [{"name": "x", "shape": [1, len(row)], "datatype": "FP64", "data": row}]})
    tensor = np.asarray([row], dtype="<f8").tobytes()
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [1, len(row)], "datatype": "FP64",
                                       "parameters": {"binary_data_size": len(tensor)}}]})
    # orjson writes 3.4028236e38 exactly as 3.4028236e38: the JSON carries the very value the probe sent
    return {
        "v2-json": ("/v2/models/m/infer", v2, ""),
        "v2-binary": ("/v2/models/m/infer", header + tensor, f"Inference-Header-Content-Length: {len(header)}\r\n"),
        "v1": ("/v1/models/m:predict", orjson.dumps({"instances": [row]}), ""),
        "mlflow": ("/invocations", orjson.dumps({"dataframe_split": {"columns": [f"f{i}" for i in range(len(row))],
                                                                     "data": [row]}}), ""),
    }


class TestBeyondFloat32:
    @pytest.mark.parametrize("path", ["v2-json", "v2-binary", "v1", "mlflow"])
    async def test_value_beyond_float32_scored_as_far_out(self, model: Model, start_guard, digits: DigitsData,
                                                          digits_profile: str, path: str) -> None:
        """A finite value beyond float32's range is maximally out of distribution in every protocol path: blocked,
        detector scores 1.0, never a scoring error that fail-open would let through."""
        guard = await start_guard(model.url, profile=digits_profile)
        target, body, extra = _bodies(_row_beyond(digits))[path]
        data = raw("POST", target, body, extra + "X-Request-Id: big\r\n")
        status, _, answer = await exchange(port_of(guard.url), data)
        assert guard.events_for("big"), (status, answer)
        (event,) = guard.events_for("big")
        assert "scoring_failure" not in event["guard"], event["guard"]
        assert event["guard"]["scores"]["ood.combined"] == 1.0
        assert event["event"]["action"] == "block" and event["event"]["kind"] == "alert"
        assert status == 403
        assert model.calls == []

    async def test_normal_row_still_allowed(self, model: Model, start_guard, digits: DigitsData,
                                            digits_profile: str) -> None:
        """The control: the same row without the huge value is allowed and reaches the model."""
        guard = await start_guard(model.url, profile=digits_profile)
        target, body, extra = _bodies([float(v) for v in digits.X_test[0]])["v2-json"]
        status, _, _ = await exchange(port_of(guard.url), raw("POST", target, body, extra))
        assert status == 200
        assert len(model.calls) == 1


@dataclass
class RawUpstream:
    """A model server written on raw sockets, for answers no HTTP library gives: it never sends ``100 Continue``
    and holds a request carrying ``Expect`` forever; with ``trickle`` it sends its head one byte at a time, never
    finishing (so no read timeout fires). Everything else gets a v2 answer."""

    trickle: bool = False
    heads: list[bytes] = field(default_factory=list)
    url: str = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if self.trickle or b"\r\nexpect:" in head.lower():
                    if self.trickle:
                        writer.write(b"HTTP/1.1 200 OK\r\n")
                    while True:  # never 100 Continue, never a whole answer: at most a header line now and then
                        await asyncio.sleep(0.3)
                        if self.trickle:
                            writer.write(b"X-Wait: 1\r\n")
                            await writer.drain()
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                body = orjson.dumps({"model_name": "m", "outputs": [
                    {"name": "predict_proba", "shape": [1, 2], "datatype": "FP64", "data": [0.5, 0.5]}]})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield up
    server.close()


V2_ROW = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [0.5, 1.5, 2.5, 3.5]}]})


async def final_exchange(port: int, data: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Like ``exchange``, but reads past interim ``1xx`` answers (the guard's own ``100 Continue``) to the final one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                status, headers, body = await read_response(reader, timeout)
                if status >= 200:
                    return status, headers, body
    finally:
        writer.close()


class TestUpstreamWaitsBounded:
    async def test_expect_continue_not_forwarded(self, raw_upstream: RawUpstream, start_guard) -> None:
        """``Expect: 100-continue`` is answered by the guard and never forwarded: more such requests than the pool
        has connections all get the model's answer, and a health passthrough still works after them."""
        guard = await start_guard(raw_upstream.url, upstream_pool_size=2, read_timeout=2.0)
        port = port_of(guard.url)
        results = await asyncio.gather(*(
            final_exchange(port, raw("POST", "/v2/models/m/infer", V2_ROW, "Expect: 100-continue\r\n"), timeout=8)
            for _ in range(3)))
        assert [r[0] for r in results] == [200, 200, 200]
        assert all(b"expect" not in h.lower() for h in raw_upstream.heads)
        status, _, _ = await exchange(port, raw("GET", "/v2/health/ready", content_type=""), timeout=8)
        assert status == 200

    async def test_upstream_that_never_finishes_gets_504(self, raw_upstream: RawUpstream, start_guard) -> None:
        """An upstream that trickles a byte at a time and never finishes its head (so no read timeout ever fires)
        costs a bounded wait: 504, and the guard keeps serving once the pool's connections are given back."""
        raw_upstream.trickle = True
        guard = await start_guard(raw_upstream.url, upstream_pool_size=2, read_timeout=1.0, connect_timeout=0.5)
        port = port_of(guard.url)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(
            exchange(port, raw("POST", "/v2/models/m/infer", V2_ROW, f"X-Request-Id: slow{i}\r\n"), timeout=12)
            for i in range(3)))
        assert [r[0] for r in results] == [504, 504, 504]
        assert asyncio.get_running_loop().time() - started < 10
        status, _, _ = await exchange(port, raw("GET", "/v2/health/ready", content_type=""), timeout=5)
        assert status == 504
        (event,) = guard.events_for("slow0")
        assert event["event"]["outcome"] == "failure"


def _policy(tmp_path: Any, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return str(path)


class TestCredentialBytes:
    @pytest.mark.parametrize("header", [b"X-API-Key: zz-secret\xe9", b"Authorization: Bearer zz-secret\xe9"])
    async def test_non_utf8_credential_is_refused_cleanly(self, model: Model, start_guard, header: bytes) -> None:
        """A key or token with a byte outside ASCII gets an answer that is not a 5xx, one event that says why,
        and nothing of the key in the event."""
        guard = await start_guard(model.url)
        data = raw("POST", "/v2/models/m/infer", V2_ROW, "X-Request-Id: key8\r\n")
        data = data.replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n\r\n", 1)
        status, _, _ = await exchange(port_of(guard.url), data)
        assert status < 500
        (event,) = guard.events_for("key8")
        assert event["guard"]["credential_error"] == "credential is not printable ASCII"
        assert event["guard"]["session_source"] == "address"
        assert "secret" not in orjson.dumps(event).decode()

    async def test_non_ascii_credential_gets_401_when_required(self, model: Model, start_guard,
                                                               tmp_path: Any) -> None:
        """With credentials required, such a key is a missing credential: 401, never forwarded."""
        guard = await start_guard(model.url,
                                  policy=_policy(tmp_path, "version: 1\naccess: {require_credentials: true}\n"))
        data = raw("POST", "/v2/models/m/infer", V2_ROW, "X-Request-Id: key9\r\n")
        data = data.replace(b"\r\n\r\n", b"\r\nX-API-Key: caf\xe9\r\n\r\n", 1)
        status, _, _ = await exchange(port_of(guard.url), data)
        assert status == 401
        assert model.calls == []
        assert len(guard.events_for("key9")) == 1


class TestKeyRotation:
    @pytest.mark.parametrize("credential", ["X-API-Key: k{i}", "Authorization: Bearer t{i}"])
    async def test_fresh_keys_share_the_address_bucket(self, model: Model, start_guard, tmp_path: Any,
                                                       credential: str) -> None:
        """Without a key registry a new key per request buys no fresh bucket: the client address's bucket throttles
        them all (burst 5: 25 of 30 fast requests are refused)."""
        guard = await start_guard(model.url, policy=_policy(
            tmp_path, "version: 1\nrate_limit: {requests_per_second: 0.5, burst: 5}\n"))
        port = port_of(guard.url)
        statuses = []
        for i in range(30):
            extra = credential.format(i=i) + "\r\n"
            statuses.append((await exchange(port, raw("POST", "/v2/models/m/infer", V2_ROW, extra)))[0])
        assert statuses.count(429) >= 24, statuses
        assert len(model.calls) <= 6

    async def test_one_key_per_address_unchanged(self, model: Model, start_guard, tmp_path: Any) -> None:
        """The control: one key keeps its own session id (the key's, not the address's) and the same bucket."""
        guard = await start_guard(model.url, policy=_policy(
            tmp_path, "version: 1\nrate_limit: {requests_per_second: 0.5, burst: 5}\n"))
        port = port_of(guard.url)
        for i in range(3):
            extra = f"X-API-Key: same\r\nX-Request-Id: s{i}\r\n"
            await exchange(port, raw("POST", "/v2/models/m/infer", V2_ROW, extra))
        sessions = {guard.events_for(f"s{i}")[0]["guard"]["session"] for i in range(3)}
        assert len(sessions) == 1
        first = guard.events_for("s0")[0]["guard"]
        assert first["session_source"] == "header"
        assert first["address_session"] not in sessions  # the address's session is named, and is another one

    async def test_rotated_keys_do_not_reset_the_trackers(self, model: Model, start_guard, digits: DigitsData,
                                                          digits_profile: str) -> None:
        """60 near-duplicate probes, each with a new key, reach the model about as often as with one key (the
        address's trackers see them all), not four times as often."""
        rng = np.random.default_rng(0)
        base = digits.X_test[3]

        async def probes(key: str | None) -> int:
            model.calls.clear()
            guard = await start_guard(model.url, profile=digits_profile)
            port = port_of(guard.url)
            for i in range(60):
                row = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 16).tolist()
                body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64", "data": row}]})
                extra = "" if key is None else f"X-API-Key: {key.format(i=i)}\r\n"
                await exchange(port, raw("POST", "/v2/models/m/infer", body, extra))
            return len(model.calls)

        one_key = await probes("one")
        rotated = await probes("k{i}-" + str(rng.integers(1 << 30)))
        assert rotated <= one_key + 5, (rotated, one_key)


class TestContentEncodingLists:
    @pytest.mark.parametrize("headers", [
        "Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
        "Content-Encoding: \r\nContent-Encoding: deflate\r\n",
        "Content-Encoding: identity, gzip\r\n",
        "Content-Encoding: gzip, identity\r\n",
    ])
    async def test_repeated_or_listed_encoding_refused(self, model: Model, start_guard, headers: str) -> None:
        """A compressed body labelled with several encodings is refused (400, one event), never decompressed by the
        guard and forwarded as plaintext under both labels."""
        import gzip
        import zlib

        guard = await start_guard(model.url)
        body = gzip.compress(V2_ROW) if "gzip" in headers else zlib.compress(V2_ROW)
        status, _, answer = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", body,
                                                                   headers + "X-Request-Id: ce\r\n"))
        assert status == 400, answer
        assert model.calls == []
        assert guard.events_for("ce")[0]["event"]["action"] == "reject"

    async def test_identity_repeated_is_plain(self, model: Model, start_guard) -> None:
        """The control: identity, however often it is said, is an uncompressed body and goes through."""
        guard = await start_guard(model.url)
        status, _, _ = await exchange(port_of(guard.url), raw(
            "POST", "/v2/models/m/infer", V2_ROW, "Content-Encoding: identity\r\nContent-Encoding: identity\r\n"))
        assert status == 200
        assert [c[3] for c in model.calls] == [V2_ROW]


async def _metric(guard: Any, name: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.admin_url))
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        text = (await reader.read()).decode()
    finally:
        writer.close()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


class TestRefusedByTheParser:
    @pytest.mark.parametrize("head", [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "X-Folded: a\r\n b\r\nContent-Length: 0\r\n",
        "Transfer-Encoding: chunked\r\n",
    ])
    async def test_parser_refusal_has_one_event(self, model: Model, start_guard, head: str) -> None:
        """A request aiohttp's HTTP parser refuses (CL+TE, duplicate CL, obs-fold, bad chunks) gets a JSON 400 and
        one reject event; nothing reaches the model."""
        guard = await start_guard(model.url)
        body = "zz\r\nnot a chunk\r\n" if head.startswith("Transfer") else "hello"
        data = f"POST /v2/models/m/infer HTTP/1.1\r\nHost: g\r\n{head}\r\n{body}".encode()
        status, _, answer = await exchange(port_of(guard.url), data)
        assert status == 400 and orjson.loads(answer)["error"]["code"] == "invalid_request"
        refusals = [e for e in guard.events if e.get("rule", {}).get("name") == "invalid_request"]
        assert len(refusals) == 1, guard.events
        assert refusals[0]["event"]["action"] == "reject" and refusals[0]["http"]["response"]["status_code"] == 400
        assert model.calls == []

    @pytest.mark.parametrize("kind", ["one-big", "many-small", "over-limit"])
    async def test_headers_too_large_is_431_with_event(self, model: Model, start_guard, kind: str) -> None:
        """A 40 KB header, 200 small headers, or headers over the guard's own limit: 431 (not 400), one event,
        counted in requests_total; the unvalidated X-Request-Id is never echoed."""
        guard = await start_guard(model.url)
        evil = '<img src=x onerror=alert(1)> "quoted"'
        extra = {"one-big": "X-Big: " + "a" * 40_000 + "\r\n",
                 "many-small": "".join(f"X-H{i}: v\r\n" for i in range(200)),
                 "over-limit": "".join(f"X-P{i}: " + "a" * 1000 + "\r\n" for i in range(20))}[kind]
        data = raw("POST", "/v2/models/m/infer", V2_ROW, f"X-Request-Id: {evil}\r\n" + extra)
        status, headers, answer = await exchange(port_of(guard.url), data)
        assert status == 431, answer
        assert "onerror" not in answer.decode() and "onerror" not in headers.get("x-request-id", "")
        refusals = [e for e in guard.events if e.get("rule", {}).get("name") == "headers_too_large"]
        assert len(refusals) == 1
        assert "onerror" not in orjson.dumps(refusals[0]).decode()
        assert 'status="431"' in await _metric(guard, "inference_guard_requests_total")
        assert model.calls == []


class TestRawPathLogged:
    async def test_url_path_is_the_raw_target(self, model: Model, start_guard) -> None:
        """A refused path is logged as sent (``%2F`` stays encoded), without its query string."""
        guard = await start_guard(model.url)
        await exchange(port_of(guard.url), raw("POST", "/v2/models%2Fm/infer?api_key=secret", V2_ROW,
                                               "X-Request-Id: rawp\r\n"))
        (event,) = guard.events_for("rawp")
        assert event["url"]["path"] == "/v2/models%2Fm/infer"
        assert "secret" not in orjson.dumps(event).decode()


class TestHeadersTheDecisionUsed:
    async def test_connection_cannot_strip_content_type(self, model: Model, start_guard) -> None:
        """``Connection: close, Content-Type`` does not strip the Content-Type the guard parsed with: the model
        gets the JSON body labelled as JSON."""
        guard = await start_guard(model.url)
        status, _, _ = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", V2_ROW,
                                                              "Connection: close, Content-Type\r\n"))
        assert status == 200
        ((_, _, headers, body),) = model.calls
        assert headers.get("Content-Type") == "application/json" and body == V2_ROW

    async def test_connection_still_strips_other_headers(self, model: Model, start_guard) -> None:
        """The control: a header the decision did not use, named in Connection, is still hop-by-hop."""
        guard = await start_guard(model.url)
        await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", V2_ROW,
                                               "Connection: X-Hop\r\nX-Hop: 1\r\n"))
        assert "X-Hop" not in model.calls[0][2]


class TestBinaryHeaderAndVersions:
    def _binary(self) -> tuple[bytes, bytes]:
        tensor = np.asarray([[0.5, 1.5, 2.5, 3.5]], dtype="<f8").tobytes()
        header = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                           "parameters": {"binary_data_size": len(tensor)}}]})
        return header, header + tensor

    async def test_duplicate_header_length_refused(self, model: Model, start_guard) -> None:
        """Two Inference-Header-Content-Length headers (one right, one wrong, in either order) are refused."""
        guard = await start_guard(model.url)
        header, body = self._binary()
        for first, second in ((len(header), 3), (3, len(header)), (len(header), len(header))):
            extra = f"Inference-Header-Content-Length: {first}\r\nInference-Header-Content-Length: {second}\r\n"
            status, _, answer = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", body, extra))
            assert status == 400
            assert b"more than once" in answer
        assert model.calls == []

    async def test_non_numeric_header_length_says_so(self, model: Model, start_guard) -> None:
        """``Inference-Header-Content-Length: abc`` gets a message about the header, not about the body."""
        guard = await start_guard(model.url)
        _, body = self._binary()
        status, _, answer = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", body,
                                                                   "Inference-Header-Content-Length: abc\r\n"))
        assert status == 400
        assert b"must be a decimal number" in answer

    async def test_int64_extremes_accepted(self, model: Model, start_guard) -> None:
        """INT64 2**63-1 and -2**63 are in range (no float rounding); 2**63 is not."""
        guard = await start_guard(model.url)
        port = port_of(guard.url)

        def body(values: list[int]) -> bytes:
            data = ",".join(map(str, values))
            return f'{{"inputs":[{{"name":"x","shape":[1,2],"datatype":"INT64","data":[{data}]}}]}}'.encode()

        status, _, answer = await exchange(port, raw("POST", "/v2/models/m/infer", body([2**63 - 1, -(2**63)])))
        assert status == 200, answer
        status, _, answer = await exchange(port, raw("POST", "/v2/models/m/infer", body([1, 2**63])))
        assert status == 400 and b"out of range" in answer

    async def test_http2_request_line_answered_400_in_http11(self, model: Model, start_guard) -> None:
        """A request line saying HTTP/2.0 over a plain connection is answered ``HTTP/1.1 400``, never forwarded,
        with one event."""
        guard = await start_guard(model.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        try:
            writer.write(raw("POST", "/v2/models/m/infer", V2_ROW, "X-Request-Id: h2\r\n", version="HTTP/2.0"))
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 400 "), status_line
        await asyncio.sleep(0.1)
        (event,) = guard.events_for("h2")
        assert event["http"]["response"]["status_code"] == 400
        assert event["rule"]["name"] == "http_version_not_supported"
        assert model.calls == []


class TestHalfClose:
    async def test_half_closed_client_gets_its_answer(self, model: Model, start_guard) -> None:
        """A client that sends a whole request and then shuts down its write side still reads the answer, and the
        guard closes the connection after it."""
        guard = await start_guard(model.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(guard.url))
        try:
            writer.write(raw("POST", "/v2/models/m/infer", V2_ROW, "X-Request-Id: half\r\n"))
            await writer.drain()
            writer.write_eof()
            status, _, body = await read_response(reader, 5)
            assert status == 200 and orjson.loads(body)["outputs"]
            assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed by the guard
        finally:
            writer.close()
        assert guard.events_for("half")[0]["event"]["outcome"] == "success"


class TestQueryStrings:
    TARGET = "/v2/models/m/infer?/../../repository/models/m/unload"

    async def test_query_refused_by_default(self, model: Model, start_guard) -> None:
        """A query string on a scored route is refused (400, one event) and never reaches the model."""
        guard = await start_guard(model.url)
        status, _, _ = await exchange(port_of(guard.url), raw("POST", self.TARGET, V2_ROW, "X-Request-Id: q\r\n"))
        assert status == 400
        assert model.calls == []
        assert guard.events_for("q")[0]["rule"]["name"] == "query-not-allowed"

    async def test_query_stripped_or_forwarded_by_policy(self, model: Model, start_guard, tmp_path: Any) -> None:
        """``input.query: strip`` forwards the path alone; ``forward`` sends it as it came."""
        for choice, expected in (("strip", "/v2/models/m/infer"), ("forward", self.TARGET)):
            model.calls.clear()
            (tmp_path / choice).mkdir()
            guard = await start_guard(model.url, policy=_policy(tmp_path / choice,
                                                                f"version: 1\ninput: {{query: {choice}}}\n"))
            status, _, _ = await exchange(port_of(guard.url), raw("POST", self.TARGET, V2_ROW))
            assert status == 200
            assert [c[1] for c in model.calls] == [expected]

    def test_bad_choice_refused_at_load(self, tmp_path: Any) -> None:
        """Anything but refuse/strip/forward is a policy error naming the field."""
        from guard_agent.policy.loader import PolicyError, load_policy_file

        with pytest.raises(PolicyError, match=r"input\.query: expected one of refuse, strip, forward"):
            load_policy_file(_policy(tmp_path, "version: 1\ninput: {query: allow}\n"))


class TestUnreachableUpstream:
    async def test_502_event_says_failure_and_why(self, start_guard) -> None:
        """A request the model server cannot take (nothing listens) is a 502 whose event has outcome failure,
        warning level and the reason."""
        from tests._support.servers import free_port

        guard = await start_guard(f"http://127.0.0.1:{free_port()}", wait_ready=False)
        status, _, _ = await exchange(port_of(guard.url), raw("POST", "/v2/models/m/infer", V2_ROW,
                                                              "X-Request-Id: down\r\n"))
        assert status == 502
        (event,) = guard.events_for("down")
        assert event["event"]["outcome"] == "failure" and event["log"]["level"] == "warning"
        assert event["guard"]["upstream_error"] == "ClientConnectorError: connection refused"
