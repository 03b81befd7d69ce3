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

from guard_agent.demo import DigitsModel
from guard_agent.tuning import derive_key, open_features, read_capture
from tests._support.servers import wait_http_ready
from tests.conftest import free_port, v2_body

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


async def test_run_captures_every_decision_and_flushes_on_sigterm(tmp_path: Path, demo_model_url: str,
                                                                  demo_model: DigitsModel) -> None:
    """The env names configure capture in `guard-agent run`; after SIGTERM every decision is on disk with
    features that open with the key file and equal what was sent."""
    port, admin = free_port(), free_port()
    key_file = tmp_path / "capture.key"
    key_file.write_text("a-secret-from-a-kubernetes-secret-0123456789\n")
    env = {**os.environ, "GUARD_HMAC_KEY": "test-hmac-key-cli-run", "GUARD_CAPTURE_DIR": str(tmp_path / "cap"),
           "GUARD_CAPTURE_KEY_FILE": str(key_file), "GUARD_CAPTURE_MAX_FILES": "3",
           "GUARD_LOG_SAMPLE_ALLOW": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "guard_agent.cli", "run", "--listen", f"127.0.0.1:{port}", "--admin-listen",
        f"127.0.0.1:{admin}", "--upstream", demo_model_url,
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    sent = demo_model.X_test[:25]
    try:
        await wait_http_ready(f"http://127.0.0.1:{admin}/readyz", lambda: proc.returncode is None, timeout=20)
        async with aiohttp.ClientSession() as http:
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
    cap = read_capture([tmp_path / "cap"], with_features=True)
    assert [d.request_id for d in cap.decisions] == [f"cli-{i}" for i in range(len(sent))]
    assert len(cap.policies) == 1
    key = derive_key(key_file.read_text())
    for d, x in zip(cap.decisions, sent, strict=True):
        assert d.sealed is not None
        assert np.array_equal(open_features(d.sealed, key, associated=d.request_id), x[None, :])
    assert b"test-hmac-key" not in b"".join(p.read_bytes() for p in (tmp_path / "cap").glob("*.jsonl"))
