"""Policy and profile files broken on disk while the guard serves: last good kept, counted, logged, still ready.

Extends tests/integration/test_reload.py and test_profile_reload.py (symlink swap, broken rule, tampered array,
deleted policy) with the remaining cases: a half-written or binary policy, and a profile whose profile.json is
truncated, deleted, or whose directory becomes a dangling symlink.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from tests._support.servers import serve_app
from tests._support.waiting import wait_for

GOOD_POLICY = "version: 1\nmode: enforce\n"
FEATURES = 6


@pytest.fixture
async def model() -> AsyncIterator[str]:
    async def infer(request: web.Request) -> web.Response:
        rows = int(orjson.loads(await request.read())["inputs"][0]["shape"][0])
        return web.json_response({"outputs": [{"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64",
                                               "data": [0.3, 0.7] * rows}]})

    app = web.Application()
    app.router.add_post("/v2/models/m/infer", infer)
    async with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(400, FEATURES))


def body(row: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP64",
                                     "data": [float(v) for v in row]}]})


async def check_still_serving(guard: Any, row: np.ndarray, rid: str) -> dict[str, Any]:
    """Ready, and a request is decided (200) with a decision event; returns that event."""
    async with aiohttp.ClientSession() as http:
        async with http.get(guard.admin_url + "/readyz") as r:
            assert r.status == 200, await r.text()
        async with http.post(guard.url + "/v2/models/m/infer", data=body(row),
                             headers={"Content-Type": "application/json", "X-Request-Id": rid}) as r:
            assert r.status == 200
    (event,) = guard.events_for(rid)
    return event


def rejected(guard: Any, prefix: str) -> list[dict[str, Any]]:
    return [e for e in guard.events if e["message"].startswith(prefix)]


class TestPolicyOnDisk:
    @pytest.mark.parametrize("broken", [
        b"version: 1\nmode: enf",                       # half-written: cut mid-token
        b"version: 1\nrules:\n  - id: x\n    action: bl",  # cut inside a rule
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",  # binary garbage
        b"",                                           # truncated to nothing
    ], ids=["cut-token", "cut-rule", "binary", "empty"])
    async def test_broken_policy_keeps_last_good(self, tmp_path: Path, model: str, start_guard,
                                                 reference: np.ndarray, broken: bytes) -> None:
        """A half-written, binary or empty policy is rejected: revision, readiness and decisions unchanged,
        the failure counted and logged as an error."""
        path = tmp_path / "policy.yaml"
        path.write_text(GOOD_POLICY)
        guard = await start_guard(model, policy=str(path))
        good = guard.state.policies.current.revision
        path.write_bytes(broken)
        assert await wait_for(lambda: rejected(guard, "policy rejected"))
        assert rejected(guard, "policy rejected")[0]["log"]["level"] == "error"
        assert guard.state.policies.current.revision == good
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_policy_reloads_total", {"result": "failed"}) == 1
        event = await check_still_serving(guard, reference[0], "after")
        assert event["guard"]["policy_revision"] == good


def fit(directory: Path, X: np.ndarray, seed: int = 0) -> None:
    from detectors import fit_profile, save_profile

    save_profile(fit_profile(X, fpr=0.01, seed=seed), directory, force=True)


class TestProfileOnDisk:
    @pytest.mark.parametrize("damage", ["truncated-json", "deleted", "dangling-symlink", "wrong-feature-count"])
    async def test_broken_profile_keeps_last_good(self, tmp_path: Path, model: str, start_guard,
                                                  reference: np.ndarray, damage: str) -> None:
        """A truncated or deleted profile.json, a profile directory turned dangling symlink, or a profile for
        another feature count never replaces the active profile; scoring goes on with the last good one."""
        real = tmp_path / "profile-v1"
        fit(real, reference)
        link = tmp_path / "profile"
        os.symlink(real.name, link)
        guard = await start_guard(model, profile=str(link))
        good = guard.state.profile.revision
        assert good is not None
        pj = real / "profile.json"
        if damage == "truncated-json":
            pj.write_bytes(pj.read_bytes()[: pj.stat().st_size // 2])
        elif damage == "deleted":
            pj.unlink()
        elif damage == "dangling-symlink":
            tmp = tmp_path / "profile.tmp"
            os.symlink("profile-v2-never-written", tmp)
            os.replace(tmp, link)
        else:
            other = tmp_path / "other"
            fit(other, np.random.default_rng(1).normal(size=(300, FEATURES + 3)))
            shutil.copytree(other, real, dirs_exist_ok=True)
        if damage == "wrong-feature-count":
            # a consistent profile of another shape is a valid profile: it loads, so this case checks the
            # guard then refuses rows of the old shape with 400 rather than scoring them wrongly
            assert await wait_for(lambda: guard.state.profile.revision != good)
            async with aiohttp.ClientSession() as http, http.post(
                    guard.url + "/v2/models/m/infer", data=body(reference[0]),
                    headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
            return
        assert await wait_for(lambda: rejected(guard, "profile rejected"))
        assert guard.state.profile.revision == good
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_profile_reloads_total", {"result": "failed"}) == 1
        event = await check_still_serving(guard, reference[0], "after")
        assert event["guard"]["profile_revision"] == good
        assert "ood.combined" in event["guard"]["scores"]
