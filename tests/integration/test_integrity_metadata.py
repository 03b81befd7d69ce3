"""Model metadata recorded with the canaries: a changed ``GET /v2/models/{m}`` document is an integrity
violation of its own (check ``metadata``), even when every canary is still answered the same."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from guard_agent.commands.canary import _record
from tests._support.waiting import wait_for
from tests.conftest import GuardFactory

W = np.random.default_rng(0).normal(size=(4, 3))


def linear_model_server(metadata: dict[str, Any]) -> web.Application:
    """A small v2 server: softmax(X @ W) as predict_proba, its argmax as predict, ``metadata`` as metadata."""

    async def infer(request: web.Request) -> web.Response:
        doc = await request.json()
        tensor = doc["inputs"][0]
        X = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
        logits = X @ W
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        n = X.shape[0]
        return web.Response(body=orjson.dumps({"model_name": "lin", "outputs": [
            {"name": "predict", "shape": [n, 1], "datatype": "INT64", "data": probs.argmax(axis=1).tolist()},
            {"name": "predict_proba", "shape": [n, 3], "datatype": "FP64", "data": probs.ravel().tolist()}]}),
            content_type="application/json")

    async def meta(request: web.Request) -> web.Response:
        return web.json_response(metadata)

    app = web.Application()
    app.router.add_post("/v2/models/lin/infer", infer)
    app.router.add_get("/v2/models/lin", meta)
    return app


class TestMetadata:
    async def test_changed_platform_is_a_violation(self, tmp_path: Path, aiohttp_server: Any,
                                                   start_guard: GuardFactory) -> None:
        """Same answers, another platform in the metadata: alert with check=metadata naming the field, 503
        under block; the original metadata restores traffic."""
        metadata: dict[str, Any] = {"name": "lin", "versions": ["1"], "platform": "sklearn",
                                    "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]}
        server = await aiohttp_server(linear_model_server(metadata))
        upstream = str(server.make_url("")).rstrip("/")
        np.save(tmp_path / "ref.npy", np.random.default_rng(1).normal(size=(300, 4)))
        args = argparse.Namespace(upstream=upstream, model="lin", data=str(tmp_path / "ref.npy"),
                                  out=str(tmp_path / "canaries"), label_column=None, count=24, pool=300, seed=0,
                                  tolerance=1e-3, protocol="v2", input_name="input-0", datatype="FP64",
                                  outputs=None, timeout=10.0, force=False)
        assert await _record(args) == 0
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nmode: enforce\nintegrity:\n  on_violation: block\n")
        guard = await start_guard(upstream, policy=str(policy), canaries=str(tmp_path / "canaries"),
                                  canary_interval=0.3)
        integrity = guard.state.integrity
        assert await wait_for(lambda: integrity.score("lin") == 0.0, timeout=10)

        metadata["platform"] = "onnxruntime"
        assert await wait_for(lambda: integrity.score("lin") == 1.0, timeout=10)
        alert = next(e for e in guard.events if e.get("event", {}).get("action") == "integrity_violation")
        assert alert["guard"]["check"] == "metadata"
        assert alert["guard"]["canaries"]["metadata_changed"] == ["platform"]
        assert alert["guard"]["canaries"]["differed"] == 0
        assert "platform" in alert["message"]
        body = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                         "data": [0.1, 0.2, 0.3, 0.4]}]})
        async with aiohttp.ClientSession() as client:
            async with client.post(guard.url + "/v2/models/lin/infer", data=body,
                                   headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 503
            registry = guard.state.metrics.registry
            assert registry.get_sample_value("inference_guard_integrity_failing",
                                             {"check": "metadata", "model": "lin"}) == 1
            assert registry.get_sample_value("inference_guard_integrity_failing",
                                             {"check": "canary", "model": "lin"}) == 0

            metadata["platform"] = "sklearn"
            assert await wait_for(lambda: integrity.score("lin") == 0.0, timeout=10)
            async with client.post(guard.url + "/v2/models/lin/infer", data=body,
                                   headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200
