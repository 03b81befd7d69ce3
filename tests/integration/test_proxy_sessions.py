"""One inference request writes its session records once, whichever way it ends: answered, refused by the
policy, or failed upstream; a request refused before its session was read writes nothing."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np
import pytest

from guard_agent.sessions.base import SessionRecord
from guard_agent.sessions.memory import MemorySessionStore
from tests._support.servers import free_port
from tests.conftest import v2_body

JSON = {"Content-Type": "application/json"}
THROTTLE = "version: 1\nmode: enforce\nrate_limit: {requests_per_second: 0.01, burst: 1}\n"


class CountingStore(MemorySessionStore):
    """The in-memory store, counting the writes per session."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: list[str] = []

    async def put(self, session: str, record: SessionRecord, now: float) -> None:
        self.puts.append(session)
        await super().put(session, record, now)


async def _send(url: str, body: bytes, **headers: str) -> int:
    async with aiohttp.ClientSession() as http, http.post(url + "/v2/models/digits/infer", data=body,
                                                          headers={**JSON, **headers}) as r:
        await r.read()
        return r.status


@pytest.fixture
def body() -> bytes:
    return v2_body(np.random.default_rng(0).uniform(0, 16, (1, 64)))


async def test_answered_and_throttled_requests_write_once(tmp_path: Path, demo_model_url: str, start_guard,
                                                          body: bytes) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(THROTTLE)
    guard = await start_guard(demo_model_url, policy=str(policy))
    store = CountingStore()
    guard.state.sessions = store
    assert await _send(guard.url, body) == 200
    assert len(store.puts) == 1
    assert await _send(guard.url, body) == 429
    assert len(store.puts) == 2 and len(set(store.puts)) == 1
    assert await _send(guard.url, b'{"inputs": [') == 400  # refused before the session is read
    assert len(store.puts) == 2


async def test_an_unregistered_key_writes_its_own_and_its_address_session_once(
        demo_model_url: str, start_guard, body: bytes) -> None:
    guard = await start_guard(demo_model_url)
    store = CountingStore()
    guard.state.sessions = store
    assert await _send(guard.url, body, **{"X-API-Key": "an-unregistered-key-0001"}) == 200
    assert len(store.puts) == 2 and len(set(store.puts)) == 2


async def test_an_upstream_failure_writes_once(start_guard, body: bytes) -> None:
    guard = await start_guard(f"http://127.0.0.1:{free_port()}", wait_ready=False)  # nothing listens there
    store = CountingStore()
    guard.state.sessions = store
    assert await _send(guard.url, body) == 502
    assert len(store.puts) == 1
