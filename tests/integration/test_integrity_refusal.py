"""A model that stops answering its canaries with an error (HTTP 4xx) after it has passed cannot keep its old
passing verdict: against a real MLServer whose model is unloaded through its repository API, the refusal becomes
a violation once it has lasted ``refused_for`` seconds; loading the model back restores it. An outage (the server
stopped: no answer at all) is not a refusal, and the last verdict stays."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.conftest import DigitsData, GuardFactory, ModelServer, free_port, start_mlserver, v2_body
from tests.integration.test_integrity_mlserver import alerts, approved_repo, policy, record, stop, wait_for

pytestmark = pytest.mark.slow

REFUSED_FOR = 2.0  # the checker's grace for refusals, shortened from 30 s for the test
SLACK = 5.0  # the box may be loaded


@pytest.fixture
async def private_model(tmp_path: Path, mlserver: ModelServer) -> tuple[str, subprocess.Popen[bytes]]:
    """A private MLServer serving the approved model (its model may be unloaded without disturbing other tests)."""
    port = free_port()
    approved_repo(mlserver, tmp_path / "repo", port)
    proc = await asyncio.to_thread(start_mlserver, tmp_path / "repo", port)
    yield f"http://127.0.0.1:{port}", proc  # type: ignore[misc]
    await asyncio.to_thread(stop, proc)


async def _repository(http: aiohttp.ClientSession, upstream: str, action: str) -> None:
    async with http.post(f"{upstream}/v2/repository/models/digits/{action}") as r:
        assert r.status == 200, await r.text()


async def _passing_guard(tmp_path: Path, upstream: str, digits: DigitsData, start_guard: GuardFactory) -> Any:
    """Canaries recorded against ``upstream``, a guard (on_violation: block, 0.5 s interval, the short grace)
    checking them, returned once the model has passed."""
    ref = tmp_path / "ref.npy"
    np.save(ref, digits.X_test)
    await record(upstream, ref, tmp_path / "canaries" / "approved")
    guard = await start_guard(upstream, policy=policy(tmp_path, "block"), canaries=str(tmp_path / "canaries"),
                              canary_interval=0.5)
    guard.state.integrity.refused_for = REFUSED_FOR
    assert await wait_for(lambda: guard.state.integrity.score("digits") == 0.0, 10 + SLACK)
    return guard


async def test_refusing_the_canaries_becomes_a_violation_then_restores(
        tmp_path: Path, private_model: tuple[str, subprocess.Popen[bytes]], digits: DigitsData,
        start_guard: GuardFactory) -> None:
    """Passing, then the model is unloaded (MLServer answers the canaries 404): the verdict stays passing for
    the grace period, then the guard alerts (integrity_violation, reason naming the refusal) and answers 503
    under on_violation: block; loading the model back restores it."""
    upstream, _ = private_model
    guard = await _passing_guard(tmp_path, upstream, digits, start_guard)
    integrity = guard.state.integrity
    async with aiohttp.ClientSession() as http:
        await _repository(http, upstream, "unload")
        unloaded = time.monotonic()
        assert await wait_for(lambda: "HTTP 404" in (integrity._errors.get("digits") or ""), 5 + SLACK)
        if time.monotonic() - unloaded < REFUSED_FOR - 0.5:
            assert integrity.score("digits") == 0.0, "one refusal is not yet a violation"
        assert await wait_for(lambda: integrity.score("digits") == 1.0, REFUSED_FOR + 10 + SLACK)
        assert time.monotonic() - unloaded >= REFUSED_FOR
        (alert, *_) = alerts(guard.events)
        assert alert["guard"]["model"] == "digits" and alert["guard"]["on_violation"] == "block"
        assert "refuses its canaries (HTTP 404 from /v2/models/digits/infer)" in alert["message"]
        assert alert["guard"]["canaries"]["reason"].startswith("the model refuses its canaries")
        async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(np.zeros(64)),
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "integrity_violation"

        await _repository(http, upstream, "load")
        assert await wait_for(lambda: integrity.score("digits") == 0.0, 10 + SLACK)
    restored = [e for e in guard.events if (e.get("event") or {}).get("action") == "integrity_restored"]
    assert restored and restored[0]["guard"]["model"] == "digits"


async def test_an_outage_keeps_the_last_verdict(
        tmp_path: Path, private_model: tuple[str, subprocess.Popen[bytes]], digits: DigitsData,
        start_guard: GuardFactory) -> None:
    """The model server stopped (connections refused) for longer than the grace period is an outage, not a
    refusal: the passing verdict stays and nothing is alerted."""
    upstream, proc = private_model
    guard = await _passing_guard(tmp_path, upstream, digits, start_guard)
    integrity = guard.state.integrity
    await asyncio.to_thread(stop, proc)
    assert await wait_for(lambda: "digits" in integrity._errors, 5 + SLACK)
    await asyncio.sleep(REFUSED_FOR + 3.0)
    assert "HTTP" not in integrity._errors["digits"]
    assert integrity.score("digits") == 0.0
    assert not alerts(guard.events)
