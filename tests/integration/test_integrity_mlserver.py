"""Canaries against a real MLServer: a swapped model is caught within one interval and blocked (503); the
approved model restores traffic; an update rolled out with its canary set beside the old one raises no alarm;
canary traffic is invisible to sessions, decision events and request metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from guard_agent.commands.canary import _record
from guard_agent.integrity import load_canaries
from tests._support.waiting import wait_for
from tests.conftest import (
    DigitsData,
    GuardFactory,
    ModelServer,
    free_port,
    start_mlserver,
    v2_body,
    write_mlserver_repo,
)

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
JSON = {"Content-Type": "application/json"}
INTERVAL = 2.0
GUARD_AGENT = str(Path(sys.executable).parent / "guard-agent")
SLACK = 3.0  # the box may be loaded: request time on top of one interval (+10% jitter)


def policy(tmp_path: Path, action: str) -> str:
    p = tmp_path / f"policy-{action}.yaml"
    p.write_text(f"version: 1\nmode: enforce\nintegrity:\n  on_violation: {action}\n")
    return str(p)


def approved_repo(mlserver: ModelServer, root: Path, port: int) -> None:
    """A second MLServer repository serving the session fixture's exact approved model file on ``port``."""
    shutil.copytree(mlserver.root / "digits", root / "digits")
    settings = json.loads((mlserver.root / "settings.json").read_text())
    settings.update(http_port=port, grpc_port=free_port(), metrics_port=free_port())
    (root / "settings.json").write_text(json.dumps(settings))


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def record(upstream: str, data: Path, out: Path, seed: int = 0) -> str:
    args = argparse.Namespace(upstream=upstream, model="digits", data=str(data), out=str(out), label_column=None,
                              count=48, pool=2048, seed=seed, tolerance=1e-3, protocol="v2", input_name="input-0",
                              datatype="FP64", outputs=None, timeout=30.0, force=True)
    assert await _record(args) == 0
    return load_canaries(out).revision


def alerts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if (e.get("event") or {}).get("action") == "integrity_violation"
            and "http" not in e]


class TestSwappedModel:
    async def test_swap_alerts_blocks_restores_and_update_rolls_quietly(
            self, tmp_path: Path, mlserver: ModelServer, digits: DigitsData, start_guard: GuardFactory) -> None:
        """A model retrained with two classes' labels swapped is caught within one canary interval and answered
        503 under on_violation: block; the approved model restores traffic; adding the new model's canary set
        beside the old one lets the swap roll out without an alarm."""
        ref = tmp_path / "ref.npy"
        np.save(ref, digits.X_test)
        canaries = tmp_path / "canaries"
        revision = await record(mlserver.url, ref, canaries / "approved")

        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        approved_root, swapped_root = tmp_path / "approved", tmp_path / "swapped"
        approved_repo(mlserver, approved_root, port)
        y_swapped = np.where(digits.y_train == 3, 8, np.where(digits.y_train == 8, 3, digits.y_train))
        await asyncio.to_thread(write_mlserver_repo, swapped_root, digits.X_train, y_swapped, port)
        proc = await asyncio.to_thread(start_mlserver, approved_root, port)
        try:
            guard = await start_guard(upstream, policy=policy(tmp_path, "block"), canaries=str(canaries),
                                      canary_interval=INTERVAL)
            integrity = guard.state.integrity
            assert await wait_for(lambda: integrity.score("digits") == 0.0, 10)
            body = v2_body(digits.X_test[:2])
            async with aiohttp.ClientSession() as client:
                async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                    assert resp.status == 200

                await asyncio.to_thread(stop, proc)
                proc = await asyncio.to_thread(start_mlserver, swapped_root, port)
                ready = time.monotonic()
                assert await wait_for(lambda: alerts(guard.events), INTERVAL * 1.1 + SLACK), "no alert"
                assert time.monotonic() - ready <= INTERVAL * 1.1 + SLACK
                alert = alerts(guard.events)[0]
                assert alert["event"]["kind"] == "alert"
                assert alert["event"]["category"] == ["intrusion_detection"]
                assert alert["event"]["outcome"] == "failure"
                assert alert["rule"]["name"] == "model-integrity"
                assert alert["threat"] == {"framework": "MITRE ATLAS", "technique": {"id": "AML.T0018"}}
                assert alert["log"]["level"] == "error"
                g = alert["guard"]
                assert g["model"] == "digits"
                assert g["check"] == "canary"
                assert g["canary_set_revision"] == revision
                assert g["on_violation"] == "block"
                assert g["canaries"]["differed"] > 0
                assert g["canaries"]["label_mismatches"] > 0
                listed = g["canaries"]["differed_canaries"]
                assert listed
                assert {d["expected_label"] for d in listed if d["expected_label"] != d["got_label"]} <= {3, 8}
                assert listed[0]["probability_diff"] > 1e-3

                async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                    assert resp.status == 503
                    assert (await resp.json())["error"]["code"] == "integrity_violation"
                blocked = [e for e in guard.events if e.get("http", {}).get("response", {}).get("status_code") == 503]
                assert blocked[-1]["rule"]["name"] == "model-integrity"
                registry = guard.state.metrics.registry
                assert registry.get_sample_value("inference_guard_integrity_failing",
                                                 {"check": "canary", "model": "digits"}) == 1
                assert registry.get_sample_value("inference_guard_integrity_violations_total",
                                                 {"check": "canary"}) == 1

                # the operator's offline check agrees, and records the swapped model's own set for later
                staged = tmp_path / "staged"
                check = await asyncio.to_thread(
                    subprocess.run, [GUARD_AGENT, "canary", "check", "--upstream", upstream, "--canaries",
                                     str(canaries)], capture_output=True, text=True, timeout=120)
                assert check.returncode == 1, check.stdout + check.stderr
                assert "FAIL digits" in check.stdout
                new_revision = await record(upstream, ref, staged, seed=1)

                await asyncio.to_thread(stop, proc)
                proc = await asyncio.to_thread(start_mlserver, approved_root, port)
                assert await wait_for(lambda: integrity.score("digits") == 0.0, INTERVAL * 1.1 + SLACK)
                assert any(e.get("event", {}).get("action") == "integrity_restored" for e in guard.events)
                async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                    assert resp.status == 200
                assert registry.get_sample_value("inference_guard_integrity_failing",
                                                 {"check": "canary", "model": "digits"}) == 0

                # update: the new set goes in beside the old one, then the model changes: no alarm
                shutil.copytree(staged, canaries / "update")
                assert await wait_for(lambda: new_revision in integrity.revisions["digits"], 5)
                before = len(alerts(guard.events))
                await asyncio.to_thread(stop, proc)
                proc = await asyncio.to_thread(start_mlserver, swapped_root, port)
                await asyncio.sleep(INTERVAL * 1.1 + 1.0)
                assert await wait_for(lambda: registry.get_sample_value(
                    "inference_guard_integrity_checks_total", {"check": "canary", "result": "pass"}) >= 4, 10)
                assert len(alerts(guard.events)) == before
                async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                    assert resp.status == 200
        finally:
            await asyncio.to_thread(stop, proc)


class TestCanaryTrafficIsInvisible:
    async def test_no_sessions_events_or_request_metrics(self, tmp_path: Path, mlserver: ModelServer,
                                                          digits: DigitsData, start_guard: GuardFactory) -> None:
        """Many canary replays leave no session, no decision event and no request metric; one real request
        leaves exactly one of each, and the client never sees canary answers."""
        ref = tmp_path / "ref.npy"
        np.save(ref, digits.X_test)
        await record(mlserver.url, ref, tmp_path / "canaries")
        guard = await start_guard(mlserver.url, policy=policy(tmp_path, "block"),
                                  canaries=str(tmp_path / "canaries"), canary_interval=0.2)
        registry = guard.state.metrics.registry
        assert await wait_for(lambda: (registry.get_sample_value(
            "inference_guard_integrity_checks_total", {"check": "canary", "result": "pass"}) or 0) >= 3, 20)
        assert guard.state.sessions.size() == 0
        assert [e for e in guard.events if "http" in e] == []
        assert registry.get_sample_value("inference_guard_requests_total",
                                         {"route": "v2_infer", "action": "allow", "status": "200"}) is None
        async with aiohttp.ClientSession() as client, \
                client.post(guard.url + INFER, data=v2_body(digits.X_test[:1]), headers=JSON) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["outputs"][0]["shape"][0] == 1
        assert guard.state.sessions.size() == 1
        decisions = [e for e in guard.events if "http" in e]
        assert len(decisions) == 1
        assert decisions[0]["guard"]["scores"]["integrity.canary"] == 0.0
        total = sum(s.value for m in registry.collect() if m.name == "inference_guard_requests"
                    for s in m.samples if s.name == "inference_guard_requests_total")
        assert total == 1
