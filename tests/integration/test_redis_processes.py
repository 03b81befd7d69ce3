"""Two `guard-agent run` processes sharing one attacker's session through the real Redis, in front of a real
MLServer: a near-duplicate probing stream sent alternately to both is stopped as early as when one guard sees it
all (the tracker state travels through Redis), and the block one process decides is enforced by the other."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from tests._support.redis import delete_prefix, keys_under
from tests._support.servers import free_port, spawn_guard, wait_http_ready
from tests.conftest import DigitsData, ModelServer, v2_body

pytestmark = [pytest.mark.redis, pytest.mark.slow]

INFER = "/v2/models/digits/infer"
MAX_QUERIES = 80
POLICY = """\
version: 1
mode: enforce
rate_limit: null
block:
  cooldown_seconds: 300
rules:
  - id: session-attack       # the default policy's top session rule, alone (no stateless rule interferes)
    when:
      session.risk: {gte: 0.95}
    action: block
"""


@pytest.fixture
async def start_guards(tmp_path: Path, mlserver: ModelServer,
                       digits_profile: str) -> AsyncIterator[Callable[..., object]]:
    """Start ``n`` `guard-agent run` processes (the digits profile, the default policy's session-attack rule)
    sharing a fresh Redis key prefix and one HMAC key; returns their base URLs. Stops them and deletes the prefix
    afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    prefix = f"it-proc-{uuid.uuid4().hex[:8]}:"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    async def start(n: int, tag: str) -> list[str]:
        urls = []
        for i in range(n):
            port, admin = free_port(), free_port()
            env = {**os.environ, "GUARD_LISTEN": f"127.0.0.1:{port}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                   "GUARD_UPSTREAM": mlserver.url, "GUARD_HMAC_KEY": "shared-test-key",
                   "GUARD_POLICY": str(policy), "GUARD_PROFILE": digits_profile,
                   "GUARD_REDIS_URL": f"redis://127.0.0.1:6379/0?key_prefix={prefix}{tag}:"}
            proc = await asyncio.to_thread(spawn_guard, env, tmp_path / f"{tag}{i}.out", tmp_path / f"{tag}{i}.err")
            procs.append(proc)
            await wait_http_ready(f"http://127.0.0.1:{admin}/readyz", lambda p=proc: p.poll() is None)  # type: ignore[misc]
            urls.append(f"http://127.0.0.1:{port}")
        return urls

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert keys_under(6379, prefix), "the guards kept their sessions in Redis"
    delete_prefix(6379, prefix)


def probing_stream(digits: DigitsData) -> np.ndarray:
    """A black-box probe: one held-out digit with small noise, the same rows for both runs."""
    rng = np.random.default_rng(7)
    x0 = digits.X_test[3]
    return np.clip(x0 + rng.normal(0.0, 0.4, size=(MAX_QUERIES, x0.size)), 0.0, 16.0)


async def first_refusal(http: aiohttp.ClientSession, urls: list[str], rows: np.ndarray) -> int | None:
    """Send the rows round-robin over ``urls`` under one API key; the 1-based query that got 403, or None."""
    for i, row in enumerate(rows):
        async with http.post(urls[i % len(urls)] + INFER, data=v2_body(row),
                             headers={"Content-Type": "application/json", "X-API-Key": "attacker"}) as r:
            if r.status == 403:
                return i + 1
            assert r.status == 200, await r.text()
    return None


async def test_two_processes_share_the_attackers_session(start_guards: Callable[..., object],
                                                         digits: DigitsData) -> None:
    rows = probing_stream(digits)
    single = await start_guards(1, "single")  # type: ignore[operator]
    pair = await start_guards(2, "pair")  # type: ignore[operator]
    async with aiohttp.ClientSession() as http:
        alone = await first_refusal(http, single, rows)
        shared = await first_refusal(http, pair, rows)
        assert alone is not None and shared is not None, (alone, shared)
        # each process saw only half of the queries: without the shared state neither would stop by ``alone``
        assert shared <= alone + 2, (alone, shared)
        # the block decided by one process (cool-down) is enforced by the other, and survives on both
        for url in pair:
            async with http.post(url + INFER, data=v2_body(digits.X_test[0]),
                                 headers={"Content-Type": "application/json", "X-API-Key": "attacker"}) as r:
                assert r.status == 403
                assert orjson.loads(await r.read())["error"]["code"] == "blocked"
    # another client is untouched: another key from another address (without a key store, every key from the
    # attacker's address also counts against that address's session, which the block covers too)
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other,
                other.post(pair[1] + INFER, data=v2_body(digits.X_test[0]),
                           headers={"Content-Type": "application/json", "X-API-Key": "someone-else"}) as r):
        assert r.status == 200
