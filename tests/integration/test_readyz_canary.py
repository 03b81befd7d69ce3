"""``/readyz`` and the first canary verdict, against a real MLServer: not ready (503, with reasons) until the
model has answered its canaries once; a model that differs becomes ready with the violation handled by
``integrity.on_violation``; canaries that cannot be replayed keep the guard not ready (fail closed), with a
bounded repeating error, until they can."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from guard_agent.integrity import load_canaries, save_canaries
from guard_agent.integrity._checker import MAX_BACKOFF
from tests.conftest import DigitsData, GuardFactory, ModelServer, free_port, start_mlserver, v2_body
from tests.integration.test_integrity_mlserver import alerts, approved_repo, policy, record, stop, wait_for

pytestmark = pytest.mark.slow

SLACK = 5.0  # the box may be loaded
STILL_WAITING = "integrity: still no canary verdict"


async def readyz(http: aiohttp.ClientSession, admin_url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(admin_url + "/readyz") as r:
        return r.status, await r.json()


@pytest.fixture
async def canary_set(tmp_path: Path, mlserver: ModelServer, digits: DigitsData) -> Path:
    """48 canaries recorded against the approved model (the session's MLServer), in ``<tmp>/recorded``."""
    ref = tmp_path / "ref.npy"
    np.save(ref, digits.X_test)
    await record(mlserver.url, ref, tmp_path / "recorded")
    return tmp_path / "recorded"


def place(recorded: Path, directory: Path, **changes: Any) -> Path:
    """Write the recorded set, with ``changes`` applied, as one set under ``directory``; returns directory."""
    save_canaries(dataclasses.replace(load_canaries(recorded), **changes), directory, force=True)
    return directory


class TestReadyzWaitsForTheFirstVerdict:
    async def test_not_ready_while_the_model_is_down_then_ready_once_it_passes(
            self, tmp_path: Path, mlserver: ModelServer, canary_set: Path, start_guard: GuardFactory) -> None:
        """The guard starts before its model: /readyz is 503 naming the upstream and the pending canary verdict
        (with the connection error); once MLServer serves the approved model, the guard becomes ready within
        the retry back-off, and never before the canaries passed."""
        port = free_port()
        guard = await start_guard(f"http://127.0.0.1:{port}", canaries=str(canary_set), canary_interval=60.0)
        integrity = guard.state.integrity
        async with aiohttp.ClientSession() as http:
            assert await wait_for(lambda: integrity.waiting_reason() and "no answer" in integrity.waiting_reason(),
                                  10)
            status, doc = await readyz(http, guard.admin_url)
            assert status == 503 and doc["ready"] is False
            assert doc["checks"]["upstream"] is False and doc["checks"]["integrity"] is False
            assert doc["checks"]["policy"] is True and doc["checks"]["accepting"] is True
            assert set(doc["reasons"]) == {"upstream", "integrity"}
            reason = doc["reasons"]["integrity"]
            assert "first canary verdict of model(s) 'digits'" in reason and "no answer, retrying" in reason
            assert "Cannot connect" in reason or "ClientConnector" in reason, reason

            root = tmp_path / "late"
            approved_repo(mlserver, root, port)
            proc = await asyncio.to_thread(start_mlserver, root, port)
            try:
                up = time.monotonic()
                seen: list[tuple[int, float | None]] = []
                while time.monotonic() - up < MAX_BACKOFF + SLACK:
                    status, doc = await readyz(http, guard.admin_url)
                    seen.append((status, integrity.score("digits")))
                    if status == 200:
                        break
                    await asyncio.sleep(0.05)
                assert status == 200, doc
                assert doc["reasons"] == {} and doc["checks"]["integrity"] is True
                assert all(score == 0.0 for s, score in seen if s == 200), "ready before the canaries passed"
                async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(np.zeros(64)),
                                     headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 200
            finally:
                await asyncio.to_thread(stop, proc)
        messages = [e["message"] for e in guard.events]
        assert "integrity: first canary verdicts in, ready" in messages
        assert not alerts(guard.events)

    async def test_a_model_that_differs_is_ready_and_blocked(
            self, tmp_path: Path, mlserver: ModelServer, canary_set: Path, start_guard: GuardFactory) -> None:
        """Canaries whose approved answers differ from what MLServer answers now (a swapped model, as far as
        the guard can tell): the failing verdict is a verdict, so the guard becomes ready, and under
        on_violation: block every inference request gets 503 integrity_violation."""
        recorded = load_canaries(canary_set)
        assert recorded.labels is not None and recorded.probabilities is not None
        swapped = place(canary_set, tmp_path / "swapped", labels=(recorded.labels + 1) % 10,
                        probabilities=np.roll(recorded.probabilities, 1, axis=1))
        guard = await start_guard(mlserver.url, policy=policy(tmp_path, "block"), canaries=str(swapped),
                                  canary_interval=60.0)
        async with aiohttp.ClientSession() as http:
            assert await wait_for(lambda: guard.state.integrity.ready, 10 + SLACK)
            status, doc = await readyz(http, guard.admin_url)
            assert status == 200 and doc["reasons"] == {}
            async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(np.zeros(64)),
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "integrity_violation"
        (alert,) = alerts(guard.events)
        assert alert["guard"]["model"] == "digits" and alert["guard"]["on_violation"] == "block"
        assert alert["guard"]["canaries"]["differed"] == recorded.count

    async def test_canaries_that_cannot_run_keep_it_not_ready(
            self, tmp_path: Path, mlserver: ModelServer, canary_set: Path, start_guard: GuardFactory) -> None:
        """A canary set for a model name MLServer does not serve (a renamed model) cannot be replayed: the
        upstream is fine but /readyz stays 503, saying why (HTTP 404) and how often it retried; the overdue
        verdict is logged as an error at a bounded rate. Fixing the set, with no restart, makes it ready."""
        canaries = tmp_path / "canaries"
        place(canary_set, canaries / "renamed", model="digits-renamed", metadata=None)
        guard = await start_guard(mlserver.url, canaries=str(canaries), canary_interval=60.0)
        integrity = guard.state.integrity
        integrity.wait_alert_after, integrity.wait_alert_every = 1.0, 2.0
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            while time.monotonic() - started < 4.5:
                status, doc = await readyz(http, guard.admin_url)
                assert status == 503 and doc["checks"]["upstream"] is True and doc["checks"]["integrity"] is False
                await asyncio.sleep(0.2)
            reason = doc["reasons"]["integrity"]
            assert "'digits-renamed'" in reason and "HTTP 404 from /v2/models/digits-renamed/infer" in reason
            assert set(doc["reasons"]) == {"integrity"}
            waiting = [e for e in guard.events if e["message"].startswith(STILL_WAITING)]
            assert 1 <= len(waiting) <= 3, "one error after 1 s, then at most one per 2 s"
            assert waiting[0]["log"]["level"] == "error"
            assert waiting[0]["guard"]["models"] == ["digits-renamed"] and waiting[0]["guard"]["attempts"] >= 2
            assert "HTTP 404" in waiting[0]["guard"]["errors"]["digits-renamed"]

            place(canary_set, canaries / ".good")
            (canaries / ".good").rename(canaries / "good")
            shutil.rmtree(canaries / "renamed")
            assert await wait_for(lambda: integrity.ready, 10 + SLACK), integrity.waiting_reason()
            status, doc = await readyz(http, guard.admin_url)
            assert status == 200 and doc["reasons"] == {}
        assert integrity.score("digits") == 0.0
        assert not alerts(guard.events)
