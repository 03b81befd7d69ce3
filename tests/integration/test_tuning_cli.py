"""`guard-agent run` as a real subprocess with GUARD_CAPTURE_* set: capture reaches disk, sealed, by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from guard_agent.tuning import derive_key, open_features, read_capture
from tests.conftest import free_port, v2_body

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


async def _wait_ready(http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        assert proc.returncode is None, "guard-agent run exited before it was ready"
        try:
            async with http.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def test_run_captures_every_decision_and_flushes_on_sigterm(tmp_path: Path) -> None:
    """The env names configure capture in `guard-agent run`; after SIGTERM every decision is on disk with
    features that open with the key file and equal what was sent."""
    from guard_agent.demo import DigitsModel, make_model_app

    model = DigitsModel()
    runner = web.AppRunner(make_model_app(model))
    await runner.setup()
    model_port, port, admin = free_port(), free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", model_port).start()
    key_file = tmp_path / "capture.key"
    key_file.write_text("a-secret-from-a-kubernetes-secret-0123456789\n")
    env = {**os.environ, "GUARD_HMAC_KEY": "test-hmac-key-cli-run", "GUARD_CAPTURE_DIR": str(tmp_path / "cap"),
           "GUARD_CAPTURE_KEY_FILE": str(key_file), "GUARD_CAPTURE_MAX_FILES": "3",
           "GUARD_LOG_SAMPLE_ALLOW": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "guard_agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--admin-listen",
        f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{model_port}",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    sent = model.X_test[:25]
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_ready(http, f"http://127.0.0.1:{admin}/readyz", proc)
            for i, x in enumerate(sent):
                async with http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=v2_body(x),
                                     headers={"Content-Type": "application/json", "X-Request-Id": f"cli-{i}",
                                              "X-API-Key": "cli-client"}) as r:
                    assert r.status == 200
                    await r.read()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    cap = read_capture([tmp_path / "cap"], with_features=True)
    assert [d.request_id for d in cap.decisions] == [f"cli-{i}" for i in range(len(sent))]
    assert len(cap.policies) == 1
    key = derive_key(key_file.read_text())
    for d, x in zip(cap.decisions, sent, strict=True):
        assert d.sealed is not None
        assert np.array_equal(open_features(d.sealed, key, associated=d.request_id), x[None, :])
    assert b"test-hmac-key" not in b"".join(p.read_bytes() for p in (tmp_path / "cap").glob("*.jsonl"))
