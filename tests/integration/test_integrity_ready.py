"""Readiness with integrity canaries: not ready until the model has answered its canaries once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from guard_agent.integrity import CanarySet, save_canaries
from tests._support.servers import serve_app

PROBS = [[0.9, 0.1], [0.2, 0.8]]


@dataclass
class HeldModel:
    """A v2 model whose infer answers only once ``release`` is set (a model still loading), with ``probs``."""

    url: str = ""
    probs: list[list[float]] = field(default_factory=lambda: PROBS)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0

    async def infer(self, request: web.Request) -> web.Response:
        self.calls += 1
        await self.release.wait()
        out = {"name": "predict_proba", "shape": [2, 2], "datatype": "FP64", "data": np.ravel(self.probs).tolist()}
        return web.Response(body=orjson.dumps({"model_name": "digits", "outputs": [out]}),
                            content_type="application/json")


@pytest.fixture
async def held_model() -> AsyncIterator[HeldModel]:
    model = HeldModel()
    app = web.Application()
    app.router.add_post("/v2/models/digits/infer", model.infer)
    async with serve_app(app, shutdown_timeout=0.5) as url:
        model.url = url
        yield model
        model.release.set()


def canaries(directory: Path) -> Path:
    save_canaries(CanarySet(model="digits", inputs=np.eye(2), labels=np.array([0, 1]), probabilities=np.array(PROBS),
                            kinds=("prototype", "prototype")), directory)
    return directory


async def readyz(http: aiohttp.ClientSession, admin_url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(admin_url + "/readyz") as r:
        return r.status, await r.json()


async def wait_ready(http: aiohttp.ClientSession, admin_url: str) -> tuple[int, dict[str, Any]]:
    for _ in range(200):
        status, doc = await readyz(http, admin_url)
        if status == 200:
            break
        await asyncio.sleep(0.05)
    return status, doc


class TestReadinessWaitsForCanaries:
    async def test_not_ready_before_the_first_verdict(self, held_model: HeldModel, start_guard,
                                                      tmp_path: Path) -> None:
        """With canaries configured, /readyz answers 503 (integrity false) while the first replay is pending, even
        though policy and upstream are fine; once the model has answered, it is ready."""
        guard = await start_guard(held_model.url, canaries=str(canaries(tmp_path / "c")), canary_interval=60.0)
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                if held_model.calls:
                    break
                await asyncio.sleep(0.02)
            assert held_model.calls >= 1, "the first canary replay started"
            status, doc = await readyz(http, guard.admin_url)
            assert status == 503
            assert doc["checks"]["integrity"] is False
            assert doc["checks"]["upstream"] is True and doc["checks"]["policy"] is True
            held_model.release.set()
            status, doc = await wait_ready(http, guard.admin_url)
            assert status == 200 and doc["checks"]["integrity"] is True
        assert guard.state.integrity.score("digits") == 0.0

    async def test_a_failing_first_verdict_is_a_verdict(self, held_model: HeldModel, start_guard,
                                                        tmp_path: Path) -> None:
        """Readiness waits for a verdict, not for a pass: a model that fails its canaries is known (and handled by
        the policy's on_violation), so the guard becomes ready and reports the violation."""
        held_model.probs = [[0.1, 0.9], [0.8, 0.2]]
        held_model.release.set()
        guard = await start_guard(held_model.url, canaries=str(canaries(tmp_path / "c")), canary_interval=60.0)
        async with aiohttp.ClientSession() as http:
            status, doc = await wait_ready(http, guard.admin_url)
        assert status == 200 and doc["checks"]["integrity"] is True
        assert guard.state.integrity.score("digits") == 1.0

    async def test_without_canaries_integrity_never_blocks_readiness(self, held_model: HeldModel,
                                                                     start_guard) -> None:
        """No canaries configured: the integrity check is true from the start."""
        guard = await start_guard(held_model.url)
        async with aiohttp.ClientSession() as http:
            status, doc = await wait_ready(http, guard.admin_url)
        assert status == 200 and doc["checks"]["integrity"] is True
