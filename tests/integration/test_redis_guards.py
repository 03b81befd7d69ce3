"""Two real guards sharing one attacker's session through Redis, in front of the demo model server.

Each guard is the full app (both listeners, real HTTP over loopback) with the Redis session store and
global index from ``guard_agent.sessions.factory``, as ``build_state`` creates them when
``GUARD_REDIS_URL`` is set.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from guard_agent.demo import DigitsModel
from guard_agent.sessions.redis.store import RedisSessionStore
from tests._support.redis import RedisServer, keys_under, redis_cmd
from tests.conftest import GuardFactory, RunningGuard, v2_body

pytestmark = [pytest.mark.redis, pytest.mark.slow]

POLICY = """\
version: 1
mode: enforce
rate_limit:
  requests_per_second: 1000
  burst: 1000
block:
  cooldown_seconds: 300
rules:
  - id: big-batch
    when:
      request.rows: {gte: 3}
    action: block
  - id: spread-attack        # a rule reading a session score: the trackers run only when one does
    when:
      session.global_fingerprint: {gte: 0.99}
    action: flag
  - id: too-many
    when:
      session.queries: {gte: 8}
    action: block
"""

INFER = "/v2/models/digits/infer"


@pytest.fixture
def policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return str(path)


PairStarter = Callable[[str, str], Awaitable[list[RunningGuard]]]


@pytest.fixture
async def start_pair(start_guard: GuardFactory, demo_model_url: str) -> AsyncIterator[PairStarter]:
    """Starts two guards in front of the demo model with the same HMAC key and Redis URL, using the Redis-backed
    store and global index; their Redis stores are closed after the test (before the guards stop).

    Tests list it after ``redis_prefix`` / ``own_redis``, so the stores flush before those are torn down."""
    started: list[RunningGuard] = []

    async def start(policy: str, redis_url: str) -> list[RunningGuard]:
        guards = [await start_guard(demo_model_url, policy=policy, redis_url=redis_url, hmac_key="shared-key")
                  for _ in range(2)]
        started.extend(guards)
        for g in guards:  # build_state picks the store from GUARD_REDIS_URL
            assert isinstance(g.state.sessions, RedisSessionStore)
        return guards

    yield start
    for g in started:
        await g.state.sessions.aclose()


async def infer(http: aiohttp.ClientSession, guard: RunningGuard, key: str, X: np.ndarray) -> tuple[int, str]:
    """POST one v2 request with an API key; (status, request id)."""
    rid = uuid.uuid4().hex
    async with http.post(guard.url + INFER, data=v2_body(X), headers={
            "X-API-Key": key, "Content-Type": "application/json", "X-Request-Id": rid}) as resp:
        await resp.read()
        return resp.status, rid


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name or not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


class TestTwoGuards:
    async def test_block_from_one_guard_is_enforced_by_the_other(self, policy: str, redis_prefix: str,
                                                                 demo_model: DigitsModel,
                                                                 start_pair: PairStarter) -> None:
        """A session blocked on guard A is refused by guard B for the cool-down; other sessions are not."""
        a, b = await start_pair(policy, f"redis://127.0.0.1:6379/0?key_prefix={redis_prefix}")
        X = demo_model.X_test
        async with aiohttp.ClientSession() as http:
            assert (await infer(http, b, "attacker", X[:1]))[0] == 200
            assert (await infer(http, a, "attacker", X[:3]))[0] == 403
            status, rid = await infer(http, b, "attacker", X[1:2])
            assert status == 403
            assert b.events_for(rid)[0]["rule"]["name"] == "big-batch"
        # another client from another address: an unregistered key from the attacker's address shares the
        # address's session, and with it the block
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
            assert (await infer(other, b, "someone-else", X[1:2]))[0] == 200

    async def test_alternating_guards_count_one_session(self, policy: str, redis_prefix: str,
                                                        demo_model: DigitsModel, start_pair: PairStarter) -> None:
        """Queries alternating between guards add up: the 9th is blocked (each guard alone saw only 4)."""
        a, b = await start_pair(policy, f"redis://127.0.0.1:6379/0?key_prefix={redis_prefix}")
        X = demo_model.X_test
        async with aiohttp.ClientSession() as http:
            statuses = [(await infer(http, (a, b)[i % 2], "stepper", X[i:i + 1]))[0] for i in range(10)]
        assert statuses == [200] * 8 + [403, 403]
        # one session for the key, and its client address's (an unregistered key also counts there)
        assert keys_under(6379, redis_prefix + "s:") and len(keys_under(6379, redis_prefix + "s:")) == 2

    async def test_spread_attack_is_seen_by_the_other_guard(self, policy: str, redis_prefix: str,
                                                           demo_model: DigitsModel, start_pair: PairStarter) -> None:
        """A near-duplicate sent to B under a new key matches queries A saw under other keys, around a point on
        the decision boundary (near-copies answered with one class only are popular inputs, not evidence)."""
        a, b = await start_pair(policy, f"redis://127.0.0.1:6379/0?key_prefix={redis_prefix}")
        rng = np.random.default_rng(0)
        x0, x1 = demo_model.X_test[0], demo_model.X_test[np.argmax(demo_model.y_test != demo_model.y_test[0])]
        label = int(demo_model.predict_proba(x0[None]).argmax())
        lo, hi = 0.0, 1.0
        for _ in range(20):  # the boundary point between two digits of different classes, as HopSkipJump finds it
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if int(demo_model.predict_proba((x0 + mid * (x1 - x0))[None]).argmax()) != label \
                else (mid, hi)
        x = (x0 + hi * (x1 - x0))[None]

        async def from_own_address(n: int, guard: RunningGuard, key: str) -> tuple[int, str]:
            # sybils come from many addresses: keys from one address would share its session already
            connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{10 + n}", 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                probe = x.copy()
                probe[0, rng.integers(0, 64, 2)] += 1.0
                return await infer(http, guard, key, probe)

        for i in range(6):
            assert (await from_own_address(i, a, f"sybil-{i}"))[0] == 200
        status, rid = await from_own_address(6, b, "sybil-new")
        assert status == 200
        seen = b.events_for(rid)[0]["guard"]["scores"]["session.global_fingerprint"]
        assert seen > 0.2  # B alone has never seen this image: its local index would say 0
        assert len(b.state.trackers.global_index) == 1


class TestOutage:
    async def test_redis_stopped_mid_traffic_fails_no_request(self, tmp_path: Path, own_redis: RedisServer,
                                                              demo_model: DigitsModel,
                                                              start_pair: PairStarter) -> None:
        """Kill our own Redis mid-traffic and restart it: every request answered 200, the fallback counted,
        and afterwards the guards are back on Redis."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.split("  - id: too-many")[0])
        server = own_redis
        guards = await start_pair(str(policy), server.url + "?key_prefix=mid:&budget_ms=40")
        X = demo_model.X_test
        statuses, slowest = [], 0.0
        async with aiohttp.ClientSession() as http:
            for i in range(60):
                if i == 20:
                    server.stop()
                if i == 40:
                    server.start()
                t0 = time.perf_counter()
                statuses.append((await infer(http, guards[i % 2], f"user-{i % 3}", X[i:i + 1]))[0])
                slowest = max(slowest, time.perf_counter() - t0)
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(g.state.sessions.link.up for g in guards):
                await asyncio.sleep(0.05)
            assert (await infer(http, guards[0], "after", X[:1]))[0] == 200
            async with http.get(guards[0].admin_url + "/metrics") as resp:
                text = await resp.text()
        assert statuses == [200] * 60
        assert slowest < 1.0
        assert metric(text, "inference_guard_redis_fallbacks_total") > 0
        assert metric(text, "inference_guard_redis_reconnects_total") >= 1
        assert metric(text, "inference_guard_redis_up") == 1
        assert redis_cmd(server.port, "EXISTS", "mid:s:" + guards[0].events[-1]["guard"]["session"]) \
            .startswith(b":1")
        ops = [orjson.dumps(e) for e in guards[0].events if "redis" in orjson.dumps(e).decode()]
        assert any(b"unreachable" in o for o in ops) and any(b"reachable again" in o for o in ops)
