"""Feature squeezing in the guard against a real (loopback) v2 model: what the extra model call contains."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web
from sklearn.datasets import load_digits

from detectors.squeeze import tabular_variants
from guard_agent.demo import DigitsModel
from guard_agent.squeezing import in_datatype
from tests._support.servers import serve_app

INFER = "/v2/models/digits/infer"
POLICY = "version: 1\nsqueeze: {enabled: true, kind: tabular}\nfailure: {budget_ms: 5000}\n"


class RecordingModel:
    """A v2 digits model that keeps every request body it was sent (the client's and the guard's squeeze call)."""

    def __init__(self, model: DigitsModel) -> None:
        self.model = model
        self.bodies: list[dict[str, Any]] = []

    async def infer(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.bodies.append(body)
        tensor = body["inputs"][0]
        X = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"][0], -1)
        proba = self.model.predict_proba(X)
        out = {"name": "predict_proba", "shape": list(proba.shape), "datatype": "FP64", "data": proba.ravel().tolist()}
        return web.Response(body=orjson.dumps({"model_name": "digits", "outputs": [out]}),
                            content_type="application/json")


@pytest.fixture
async def model(demo_model: DigitsModel) -> AsyncIterator[tuple[RecordingModel, str]]:
    recording = RecordingModel(demo_model)
    app = web.Application()
    app.router.add_post(INFER, recording.infer)
    async with serve_app(app) as url:
        yield recording, url


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A profile fitted on the first 1,000 digits (the requests below come from the rest)."""
    from detectors import fit_profile, save_profile

    X, _ = load_digits(return_X_y=True)
    out = tmp_path_factory.mktemp("profile") / "digits"
    save_profile(fit_profile(X[:1000], fpr=0.01, seed=0), out)
    return str(out)


def body(X: np.ndarray, datatype: str) -> bytes:
    data = X.astype(np.int64).ravel().tolist() if datatype.startswith(("INT", "UINT")) else X.ravel().tolist()
    return orjson.dumps({"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": datatype, "data": data}],
                         "outputs": [{"name": "predict_proba"}]})


async def squeeze_call(recording: RecordingModel, guard_url: str, X: np.ndarray, datatype: str,
                       rid: str) -> dict[str, Any]:
    """Send one request through the guard; return the squeeze call the model received for it."""
    async with aiohttp.ClientSession() as http, http.post(
            guard_url + INFER, data=body(X, datatype),
            headers={"Content-Type": "application/json", "X-Request-Id": rid}) as r:
        assert r.status == 200
    squeeze = [b for b in recording.bodies if b["inputs"][0]["shape"][0] == 3 * X.shape[0]]
    assert len(squeeze) == 1, "exactly one squeeze call per request"
    return squeeze[0]


class TestTabularSqueezing:
    async def test_a_single_row_is_squeezed(self, model: tuple[RecordingModel, str], start_guard, tmp_path: Path,
                                            profile_dir: str) -> None:
        """A one-row request gets a bit-depth copy on the reference data's grid that differs from the row (the
        batch's own range is empty for one row: a copy on that grid would be the request itself)."""
        recording, url = model
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        guard = await start_guard(url, policy=str(policy), profile=profile_dir)
        X, _ = load_digits(return_X_y=True)
        row = X[1500:1501]
        sent = await squeeze_call(recording, guard.url, row, "FP64", "one-row")
        copies = np.asarray(sent["inputs"][0]["data"], dtype=np.float64).reshape(3, 64)
        np.testing.assert_array_equal(copies[0], row[0])
        assert np.any(copies[2] != row[0]), "the bit-depth copy of a single row must not be the row itself"
        (event,) = guard.events_for("one-row")
        assert 0.0 <= event["guard"]["scores"]["adv.squeeze"] <= 1.0

    @pytest.mark.parametrize("datatype", ["INT32", "UINT8", "FP32"])
    async def test_squeeze_call_keeps_the_client_datatype(self, model: tuple[RecordingModel, str], start_guard,
                                                          tmp_path: Path, profile_dir: str, datatype: str) -> None:
        """The squeezed copies are sent in the client's datatype (integers for integer tensors), never as FP64."""
        recording, url = model
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        guard = await start_guard(url, policy=str(policy), profile=profile_dir)
        X, _ = load_digits(return_X_y=True)
        sent = await squeeze_call(recording, guard.url, X[1500:1502], datatype, f"dt-{datatype}")
        tensor = sent["inputs"][0]
        assert tensor["datatype"] == datatype
        if datatype != "FP32":
            assert all(type(v) is int for v in tensor["data"])
            assert min(tensor["data"]) >= 0


class TestHelpers:
    def test_tabular_variants_use_the_reference_grid(self) -> None:
        """The bit-depth copy is on the reference range's grid (clipped to it) for one row as for many; a feature
        constant in the reference keeps its value."""
        low, high = np.array([0.0, 0.0, 5.0]), np.array([16.0, 1.0, 5.0])
        row = np.array([[7.3, 2.0, 9.0]])
        rounded, quantised = tabular_variants(row, 2, (low, high))
        np.testing.assert_allclose(rounded, [[7.3, 2.0, 9.0]])
        np.testing.assert_allclose(quantised, [[16.0 / 3 * 1, 1.0, 9.0]])
        batch = np.vstack([row, row + 0.1])
        np.testing.assert_allclose(tabular_variants(batch, 2, (low, high))[1][0], quantised[0])

    @pytest.mark.parametrize(("datatype", "expected"), [
        ("UINT8", [0, 4, 255]), ("INT8", [-5, 4, 127]), ("INT64", [-5, 4, 300]), ("FP16", [-5.0, 3.6, 300.0]),
    ])
    def test_in_datatype(self, datatype: str, expected: list[float]) -> None:
        """Integer datatypes get rounded integers clipped to the type's range; float types keep the values."""
        assert in_datatype(np.array([[-5.0, 3.6, 300.0]]), datatype) == expected
