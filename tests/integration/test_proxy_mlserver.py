"""The guard in front of a real MLServer: passthrough, refusals, invalid input, block/throttle/harden."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from tests._support.servers import ServePost
from tests.conftest import DigitsData, ModelServer, v2_body

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
JSON = {"Content-Type": "application/json"}


def write_policy(tmp_path: Path, text: str) -> str:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return str(p)


class TestPassthrough:
    async def test_v2_request_forwarded_byte_for_byte(self, mlserver: ModelServer, start_guard, digits: DigitsData
                                                      ) -> None:
        """An allowed request reaches MLServer unchanged; the answer equals a direct call's answer."""
        guard = await start_guard(mlserver.url)
        body = v2_body(digits.X_test[:3])
        async with aiohttp.ClientSession() as http:
            async with http.post(mlserver.url + INFER, data=body,
                                 headers={"Content-Type": "application/json"}) as direct:
                direct_doc = await direct.json()
            async with http.post(guard.url + INFER, data=body, headers={"Content-Type": "application/json",
                                                                         "X-Request-Id": "req-pass-1"}) as resp:
                assert resp.status == 200
                assert resp.headers["X-Request-Id"] == "req-pass-1"
                doc = await resp.json()
        assert doc["outputs"] == direct_doc["outputs"]
        (event,) = guard.events_for("req-pass-1")
        assert event["event"]["action"] == "allow" and event["event"]["outcome"] == "success"
        assert event["guard"]["rows"] == 3 and event["guard"]["model"] == "digits"
        assert event["guard"]["policy_revision"] == guard.state.policies.current.revision
        assert "input.schema" in event["guard"]["scores"]

    async def test_exact_bytes_reach_the_model(self, start_guard, serve_post: ServePost,  # type: ignore[no-untyped-def]
                                               tmp_path: Path) -> None:
        """The upstream receives exactly the bytes that were scored (odd spacing and key order kept)."""
        from aiohttp import web
        from multidict import CIMultiDict

        seen: list[tuple[bytes, CIMultiDict[str]]] = []

        async def echo(request: web.Request) -> web.Response:
            seen.append((await request.read(), CIMultiDict(request.headers)))
            return web.json_response({"outputs": []})

        upstream = await serve_post(INFER, echo)
        # a query string on an inference route is refused unless the policy forwards it: this one does
        guard = await start_guard(upstream, policy=write_policy(tmp_path, "version: 1\ninput: {query: forward}\n"))
        body = b'{ "outputs":[],  "inputs" : [ {"datatype":"FP32","name":"a","shape":[1,2],"data":[1.50, 2]} ] }'
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + INFER + "?trace=1", data=body,
                headers={"Content-Type": "application/json", "Connection": "keep-alive, X-Secret-Hop",
                         "X-Secret-Hop": "drop-me", "X-API-Key": "k1"}) as resp:
            assert resp.status == 200
        got, headers = seen[0]
        assert got == body
        assert "X-Secret-Hop" not in headers
        assert headers["X-Forwarded-For"] == "127.0.0.1"
        assert len(headers["X-Request-Id"]) == 32

    async def test_health_and_metadata_pass_through(self, mlserver: ModelServer, start_guard) -> None:
        """Read-only health and metadata routes are forwarded unscored."""
        guard = await start_guard(mlserver.url)
        async with aiohttp.ClientSession() as http:
            for path in ("/v2/health/ready", "/v2/models/digits", "/v2/models/digits/ready"):
                async with http.get(guard.url + path) as resp:
                    assert resp.status == 200, path


class TestRefusals:
    @pytest.mark.parametrize(("method", "path", "status"), [
        ("POST", "/v2/repository/models/digits/unload", 403),
        ("POST", "/v2/repository/index", 403),
        ("GET", "/v2/models/digits/infer", 403),
        ("POST", "/v2/models/digits/infer/", 403),
        ("POST", "/V2/models/digits/infer", 403),
        ("POST", "/v2/models/digits/%69nfer", 400),
        ("POST", "/v2/models/digits/../../repository/models/digits/unload", 400),
        ("POST", "/v2/models/digits%2Finfer", 400),
        ("POST", "/v2//models/digits/infer", 400),
    ])
    async def test_refused_routes_never_reach_the_model(self, mlserver: ModelServer, start_guard, method: str,
                                                        path: str, status: int) -> None:
        """Unlisted routes and ambiguous path forms are refused with a JSON error and never forwarded."""
        guard = await start_guard(mlserver.url)
        async with aiohttp.ClientSession() as http, http.request(
                method, aiohttp.client.URL(guard.url + path, encoded=True), data=b"{}",
                headers={"X-Request-Id": "refuse-1"}) as resp:
            assert resp.status == status
            doc = await resp.json()
        assert doc["error"]["request_id"] == "refuse-1"
        (event,) = guard.events_for("refuse-1")
        assert event["event"]["action"] == "reject" and event["event"]["outcome"] == "failure"
        # the model is still loaded: the unload never reached it
        async with aiohttp.ClientSession() as http, http.get(mlserver.url + "/v2/models/digits/ready") as r:
            assert r.status == 200


class TestInvalidInput:
    @pytest.mark.parametrize(("body", "headers", "fragment"), [
        (b'{"inputs": [', {}, "JSON"),
        (b'{"inputs":[{"name":"a","shape":[1,2],"datatype":"FP64","data":[1,2]}],"inputs":[]}', {}, "duplicate"),
        (b'{"inputs":[{"name":"a","shape":[1,3],"datatype":"FP64","data":[1,2]}]}', {}, "shape"),
        (b'{"inputs":[{"name":"a","shape":[1,2],"datatype":"FP64","data":["x","y"]}]}', {}, "numeric"),
        (b'{"inputs":[{"name":"a","shape":[1],"datatype":"BYTES","data":["x"]},'
         b'{"name":"b","shape":[1],"datatype":"FP64","data":[1]}]}', {}, "cannot be mixed"),
        (b'{"inputs":[{"name":"a","shape":[1,2],"datatype":"FP64","data":[NaN,1]}]}', {}, "NaN"),
        (b'{"inputs":[{"name":"a","shape":[1,2],"datatype":"FP64","data":[1,2]}]}',
         {"Content-Encoding": "gzip"}, "Content-Encoding"),
    ])
    async def test_invalid_payloads_get_400_and_never_reach_the_model(
            self, start_guard, serve_post: ServePost, body: bytes, headers: dict[str, str], fragment: str) -> None:  # type: ignore[no-untyped-def]
        """Invalid payloads get 400 naming the problem; nothing is forwarded; a reject event is logged."""
        from aiohttp import web

        calls: list[bytes] = []

        async def infer(request: web.Request) -> web.Response:
            calls.append(await request.read())
            return web.json_response({"outputs": []})

        upstream = await serve_post(INFER, infer)
        guard = await start_guard(upstream)
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + INFER, data=body,
                headers={"Content-Type": "application/json", "X-Request-Id": "bad-1", **headers}) as resp:
            assert resp.status == 400
            doc = await resp.json()
        assert fragment.lower() in doc["error"]["message"].lower()
        assert calls == []
        (event,) = guard.events_for("bad-1")
        assert event["event"]["action"] == "reject"

    async def test_body_too_large_is_413(self, mlserver: ModelServer, start_guard) -> None:
        """A body over max_body_bytes gets 413 without being forwarded."""
        guard = await start_guard(mlserver.url, max_body_bytes=1000)
        async with aiohttp.ClientSession() as http, http.post(guard.url + INFER, data=b"x" * 5000) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"

    async def test_headers_too_large_is_431(self, mlserver: ModelServer, start_guard) -> None:
        """Headers over max_header_bytes get 431."""
        guard = await start_guard(mlserver.url, max_header_bytes=2048)
        async with aiohttp.ClientSession() as http, http.get(guard.url + "/v2/health/ready",
                                                             headers={"X-Big": "a" * 4000}) as resp:
            assert resp.status == 431


class TestUpstreamFaults:
    async def test_refused_upstream_is_502(self, start_guard) -> None:
        """Nothing listening upstream: 502 with the JSON error body."""
        from tests.conftest import free_port

        guard = await start_guard(f"http://127.0.0.1:{free_port()}", wait_ready=False)
        async with aiohttp.ClientSession() as http, http.post(guard.url + INFER, data=v2_body(np.ones(4)),
                                                              headers=JSON) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_unavailable"

    async def test_slow_upstream_is_504(self, start_guard, serve_post: ServePost) -> None:  # type: ignore[no-untyped-def]
        """An upstream slower than read_timeout: 504 within the timeout."""
        import asyncio
        import time

        from aiohttp import web

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(5)
            return web.json_response({})

        upstream = await serve_post(INFER, slow)
        guard = await start_guard(upstream, read_timeout=0.3)
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http, http.post(guard.url + INFER, data=v2_body(np.ones(4)),
                                                              headers=JSON) as resp:
            assert resp.status == 504
        assert time.monotonic() - t0 < 2.0


class TestEnforcement:
    async def test_block_by_declared_range(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                           digits: DigitsData) -> None:
        """Input outside declared bounds is blocked (403) by the built-in schema check."""
        policy = write_policy(tmp_path, "version: 1\ninput: {min: 0, max: 16}\nrules:\n"
                                        "  - id: out-of-range\n    when: {input.schema: {gte: 1}}\n"
                                        "    action: block\n")
        guard = await start_guard(mlserver.url, policy=policy)
        async with aiohttp.ClientSession() as http:
            async with http.post(guard.url + INFER, data=v2_body(digits.X_test[0] * 10),
                                 headers={**JSON, "X-Request-Id": "blk-1"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["message"] == "request refused by policy"
            async with http.post(guard.url + INFER, data=v2_body(digits.X_test[0]), headers=JSON) as resp:
                assert resp.status == 200
        (event,) = guard.events_for("blk-1")
        assert event["event"]["kind"] == "alert" and event["rule"]["name"] == "out-of-range"
        assert event["threat"]["technique"]["id"] == "AML.T0015"

    async def test_throttle_with_retry_after(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                             digits: DigitsData) -> None:
        """Past the per-session token bucket: 429 with Retry-After; another client is unaffected (from another
        address: an unregistered key from the same address shares that address's bucket)."""
        policy = write_policy(tmp_path, "version: 1\nrate_limit: {requests_per_second: 0.5, burst: 3}\n")
        guard = await start_guard(mlserver.url, policy=policy)
        statuses = []
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                async with http.post(guard.url + INFER, data=v2_body(digits.X_test[0]),
                                     headers={**JSON, "X-API-Key": "flooder"}) as resp:
                    statuses.append(resp.status)
                    retry = resp.headers.get("Retry-After")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other, \
                other.post(guard.url + INFER, data=v2_body(digits.X_test[0]),
                           headers={**JSON, "X-API-Key": "someone-else"}) as resp:
            assert resp.status == 200
        assert statuses == [200, 200, 200, 429, 429]
        assert retry is not None and int(retry) >= 1

    async def test_harden_rewrites_real_response(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                                 digits: DigitsData) -> None:
        """A harden decision returns rounded top-1 probabilities instead of MLServer's full vector."""
        policy = write_policy(tmp_path, "version: 1\nhardening: {round_digits: 1, top_k: 1}\nrules:\n"
                                        "  - id: harden-all\n    when: {request.rows: {gte: 1}}\n"
                                        "    action: harden\n")
        guard = await start_guard(mlserver.url, policy=policy)
        async with aiohttp.ClientSession() as http, http.post(guard.url + INFER, data=v2_body(digits.X_test[:2]),
                                                              headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, (await r.text(), guard.events[-1])
            doc = orjson.loads(await r.read())
        probs = np.asarray(doc["outputs"][0]["data"]).reshape(2, 10)
        assert ((probs > 0).sum(axis=1) == 1).all()
        assert np.allclose(probs, np.round(probs, 1))

    async def test_monitor_mode_forwards_but_reports(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                                     digits: DigitsData) -> None:
        """In monitor mode a block decision is logged (enforced=false) and the request is served."""
        policy = write_policy(tmp_path, "version: 1\nmode: monitor\nrules:\n"
                                        "  - id: block-all\n    when: {request.rows: {gte: 1}}\n    action: block\n")
        guard = await start_guard(mlserver.url, policy=policy)
        async with aiohttp.ClientSession() as http, http.post(guard.url + INFER, data=v2_body(digits.X_test[0]),
                                                              headers={**JSON, "X-Request-Id": "mon-1"}) as resp:
            assert resp.status == 200
        (event,) = guard.events_for("mon-1")
        assert event["event"]["action"] == "block" and event["guard"]["enforced"] is False
        assert event["guard"]["mode"] == "monitor"

    async def test_block_cooldown_and_admin_unblock(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                                    digits: DigitsData) -> None:
        """After a block the session stays blocked; an operator can unblock it through /admin."""
        policy = write_policy(tmp_path, "version: 1\ninput: {max: 16}\nblock: {cooldown_seconds: 600}\nrules:\n"
                                        "  - id: out-of-range\n    when: {input.schema: {gte: 1}}\n"
                                        "    action: block\n")
        guard = await start_guard(mlserver.url, policy=policy)
        hdr = {**JSON, "X-API-Key": "attacker"}
        async with aiohttp.ClientSession() as http:
            async with http.post(guard.url + INFER, data=v2_body(digits.X_test[0] * 10), headers=hdr) as r:
                assert r.status == 403
            async with http.post(guard.url + INFER, data=v2_body(digits.X_test[0]), headers=hdr) as r:
                assert r.status == 403
            session = guard.events[-1]["guard"]["session"]
            # an unregistered key's block holds its client address's session too: both are unblocked
            address_session = guard.events[-1]["guard"]["address_session"]
            auth = {"Authorization": "Bearer test-admin-token"}
            async with http.post(f"{guard.admin_url}/admin/sessions/{session}/unblock") as r:
                assert r.status == 401
            for blocked in (session, address_session):
                async with http.post(f"{guard.admin_url}/admin/sessions/{blocked}/unblock", headers=auth) as r:
                    assert r.status == 200
            async with http.post(guard.url + INFER, data=v2_body(digits.X_test[0]), headers=hdr) as r:
                assert r.status == 200
