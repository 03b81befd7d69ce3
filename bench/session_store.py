"""Print the session stores' costs (figures, not assertions).

    /work/venv/bin/python bench/session_store.py [--sessions 100000] [--real 2000] [--redis-requests 2000]

1. Memory: ``--sessions`` live sessions in the in-memory store, each with a record as the proxy leaves it
   (token bucket, last scores) and tracker state for 64 features (the digits model). ``--real`` sessions
   get their state from real tracker updates; the rest are decoded copies of those states (own arrays,
   same fixed-size layout, so the same memory) because a real update costs about a millisecond each.
   Reported: resident-set growth per session and for the whole population.
2. Redis (the server on 127.0.0.1:6379, under a unique key prefix deleted afterwards): latency of one
   request's session round trip (get + put with ~4 KB of tracker state) and of one global-index
   observation, sequential and with 32 concurrent requests.
3. A real guard in front of the demo model, memory store vs Redis store: end-to-end latency per request.
4. Redis memory of the global fingerprint index filled to ``--global-entries`` (its bound, 100k by default).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import uuid

import numpy as np

from guard_agent.events import CallbackSink, EventLogger
from guard_agent.metrics import Metrics
from guard_agent.ratelimit import take
from guard_agent.sessions.factory import make_global_observer, make_session_store
from guard_agent.sessions.memory import MemorySessionStore
from guard_agent.settings import Settings
from guard_agent.tracking import SessionTracking

SALT = b"bench-session-store-salt"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class _Answer:
    def __init__(self, rng: np.random.Generator) -> None:
        p = rng.dirichlet(np.full(10, 0.3))[None, :]
        self.probabilities = p
        self.labels = p.argmax(axis=1)


async def memory(n_sessions: int, n_real: int) -> None:
    rng = np.random.default_rng(0)
    tracking = SessionTracking({}, salt=SALT)
    engine = tracking.engine(None, 64)
    store = MemorySessionStore(max_sessions=n_sessions + 1, ttl=3600.0)
    gc.collect()
    before = rss_bytes()
    now = time.time()
    templates: list[bytes] = []
    t0 = time.perf_counter()
    for i in range(n_sessions):
        sid = f"{i:064x}"
        record = store.get_sync(sid, now)
        record.bucket, _, _ = take(record.bucket, now, rate=50, burst=100)
        record.queries += 1
        if i < n_real:
            x = rng.integers(0, 17, size=(1, 64)).astype(np.float64)
            scores = await tracking.peek(sid, record, x, None, now)
            record.scores = dict(await tracking.update(sid, record, x, None, _Answer(rng), now, scores))
            encoded = tracking.encode_state(record.tracker_state)
            assert encoded is not None
            templates.append(encoded)
        else:
            record.tracker_state = tracking.decode_state(templates[i % len(templates)])
            record.scores = dict(engine.peek(record.tracker_state[engine.config.layout_id], now))
    real_ms = (time.perf_counter() - t0) / max(1, n_sessions) * 1e3
    gc.collect()
    grown = rss_bytes() - before
    print(f"memory store: {store.size():,} live sessions with tracker state (64 features, "
          f"{len(templates[0])} B encoded each)")
    print(f"  resident growth {grown / 2**20:8.1f} MiB  = {grown / n_sessions:7.0f} B/session"
          f"  -> 100k sessions ~ {grown / n_sessions * 100_000 / 2**20:.0f} MiB (issue target: 1024 MiB)")
    print(f"  (fill took {real_ms:.3f} ms/session on average; {min(n_real, n_sessions)} real tracker updates)")
    del store, templates
    gc.collect()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1e3


async def redis_latency(n: int) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:10]}:"
    settings = Settings(redis_url=f"redis://127.0.0.1:6379/0?key_prefix={prefix}&budget_ms=1000",
                        hmac_key="bench")
    metrics, events = Metrics(), EventLogger(CallbackSink(lambda _: None))
    tracking = SessionTracking({}, salt=SALT)
    store = make_session_store(settings, metrics=metrics, events=events, tracking=tracking)
    index = make_global_observer(settings, metrics=metrics, events=events, tracking=tracking)
    engine = tracking.engine(None, 64)
    rng = np.random.default_rng(1)
    now = time.time()
    try:
        # sessions with real tracker state
        for s in range(50):
            record = await store.get(f"s{s}", now)
            x = rng.integers(0, 17, size=(1, 64)).astype(np.float64)
            record.scores = dict(await tracking.update(f"s{s}", record, x, None, _Answer(rng), now, {}))
            await store.put(f"s{s}", record, now)

        async def one(i: int) -> float:
            t0 = time.perf_counter()
            record = await store.get(f"s{i % 50}", now + i * 1e-3)
            record.queries += 1
            record.bucket, _, _ = take(record.bucket, now + i * 1e-3, rate=50, burst=100)
            record.scores = {**record.scores, "session.rate": float(i)}  # forces a state write
            await store.put(f"s{i % 50}", record, now + i * 1e-3)
            return time.perf_counter() - t0

        seq = [await one(i) for i in range(n)]
        print(f"redis session round trip (get+put, ~{len(tracking.encode_state(record.tracker_state) or b'')} B "
              f"state), sequential n={n}: p50 {_pct(seq, 50):.2f} ms  p99 {_pct(seq, 99):.2f} ms  "
              f"mean {statistics.fmean(seq) * 1e3:.2f} ms")
        t0 = time.perf_counter()
        conc: list[float] = []
        for start in range(0, n, 32):
            conc += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 32))))
        wall = time.perf_counter() - t0
        print(f"  32 concurrent: p50 {_pct(conc, 50):.2f} ms  p99 {_pct(conc, 99):.2f} ms  "
              f"throughput {n / wall:,.0f} round trips/s (one process, one core)")
        rows1 = [rng.integers(0, 17, size=(1, 64)).astype(np.float64) for _ in range(n)]
        fps = [(engine.fingerprints(r), engine.row_keys(r)) for r in rows1]
        obs = []
        for i, (fp, dg) in enumerate(fps):
            t0 = time.perf_counter()
            await index.observe(f"k{i % 200}", fp, dg, now + i * 1e-3)
            obs.append(time.perf_counter() - t0)
        print(f"redis global index observe (1 row, incl. local mirror): p50 {_pct(obs, 50):.2f} ms  "
              f"p99 {_pct(obs, 99):.2f} ms")
        fallbacks = sum(s.value for m in metrics.registry.collect() if m.name == "inference_guard_redis_fallbacks"
                        for s in m.samples if s.name.endswith("_total"))
        print(f"  fallbacks during the run: {fallbacks:.0f}")
        client = store.link.client  # type: ignore[attr-defined]
        used = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        total = sum([int(await client.memory_usage(k) or 0) for k in used])
        print(f"  Redis memory for {len(used)} keys (50 sessions + {n} index entries): {total / 2**20:.1f} MiB")
    finally:
        client = store.link.client  # type: ignore[attr-defined]
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i:i + 500])
        await store.aclose()  # type: ignore[attr-defined]


async def guard_latency(n: int) -> None:
    """End-to-end request latency through a real guard: memory store vs Redis store (same process, loopback)."""
    import tempfile
    from pathlib import Path

    import aiohttp
    import orjson
    from aiohttp import web

    from guard_agent.app import build_state
    from guard_agent.demo import DigitsModel, make_model_app
    from guard_agent.server import start_listeners
    from guard_agent.sessions.redis.store import RedisSessionStore

    def port() -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    model = DigitsModel()
    upstream = web.AppRunner(make_model_app(model), access_log=None)
    await upstream.setup()
    up_port = port()
    await web.TCPSite(upstream, "127.0.0.1", up_port).start()
    prefix = f"bench-{uuid.uuid4().hex[:10]}:"
    runners: list[web.AppRunner] = []
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text("version: 1\nmode: enforce\nrate_limit:\n  requests_per_second: 1000000\n"
                          "  burst: 1000000\n")
        try:
            for label, redis_url in (("memory", None), ("redis", f"redis://127.0.0.1:6379/0?key_prefix={prefix}")):
                settings = Settings(listen=f"127.0.0.1:{port()}", admin_listen=f"127.0.0.1:{port()}",
                                    upstream=f"http://127.0.0.1:{up_port}", policy=str(policy),
                                    hmac_key="bench-hmac-key", redis_url=redis_url)
                state = build_state(settings, sink=CallbackSink(lambda _: None))
                if redis_url and not isinstance(state.sessions, RedisSessionStore):
                    state.sessions = make_session_store(settings, metrics=state.metrics, events=state.events,
                                                        tracking=state.trackers)
                    make_global_observer(settings, metrics=state.metrics, events=state.events,
                                         tracking=state.trackers)
                runners += list(await start_listeners(state))
                await asyncio.sleep(0.3)
                took: list[float] = []
                async with aiohttp.ClientSession() as http:
                    for i in range(n + 50):
                        x = model.X_test[i % len(model.X_test)][None, :]
                        body = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP64",
                                                         "data": x.ravel().tolist()}]})
                        t0 = time.perf_counter()
                        async with http.post(f"http://{settings.listen}/v2/models/digits/infer", data=body,
                                             headers={"X-API-Key": f"user-{i % 20}",
                                                      "Content-Type": "application/json"}) as resp:
                            await resp.read()
                            assert resp.status == 200, resp.status
                        if i >= 50:
                            took.append(time.perf_counter() - t0)
                results[label] = took
                if isinstance(state.sessions, RedisSessionStore):
                    await state.sessions.aclose()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            await upstream.cleanup()
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
            keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
            for i in range(0, len(keys), 500):
                await client.delete(*keys[i:i + 500])
            await client.aclose()
    for label, took in results.items():
        print(f"guard end-to-end, {label:6} store, sequential n={n} (20 keys, demo model): "
              f"p50 {_pct(took, 50):.2f} ms  p99 {_pct(took, 99):.2f} ms")
    print(f"  Redis adds p50 {_pct(results['redis'], 50) - _pct(results['memory'], 50):+.2f} ms per request")


async def global_fill(n: int) -> None:
    """Redis memory of the global index filled to ``n`` entries (its bound is max_entries = 100k)."""
    prefix = f"bench-{uuid.uuid4().hex[:10]}:"
    settings = Settings(redis_url=f"redis://127.0.0.1:6379/0?key_prefix={prefix}&budget_ms=2000",
                        hmac_key="bench-hmac-key")
    metrics, events = Metrics(), EventLogger(CallbackSink(lambda _: None))
    tracking = SessionTracking({}, salt=SALT)
    store = make_session_store(settings, metrics=metrics, events=events, tracking=tracking)
    index = make_global_observer(settings, metrics=metrics, events=events, tracking=tracking)
    engine = tracking.engine(None, 64)
    rng = np.random.default_rng(2)
    client = store.link.client  # type: ignore[attr-defined]
    try:
        t0 = time.perf_counter()
        for i in range(0, n, 32):
            rows = rng.integers(0, 17, size=(min(32, n - i), 64)).astype(np.float64)
            await index.observe(f"k{i}", engine.fingerprints(rows), engine.row_keys(rows), time.time())
        fill = time.perf_counter() - t0
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=5000)]
        total = 0
        for i in range(0, len(keys), 1000):
            pipe = client.pipeline(transaction=False)
            for k in keys[i:i + 1000]:
                pipe.memory_usage(k)
            total += sum(int(v or 0) for v in await pipe.execute())
        fallbacks = sum(s.value for m in metrics.registry.collect() if m.name == "inference_guard_redis_fallbacks"
                        for s in m.samples if s.name.endswith("_total"))
        print(f"redis global index with {n:,} entries ({len(keys):,} keys): {total / 2**20:.1f} MiB "
              f"= {total / n:.0f} B/entry (filled in {fill:.1f} s, 32 rows per call; fallbacks {fallbacks:.0f})")
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=5000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i:i + 1000])
        await store.aclose()  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--real", type=int, default=2000)
    ap.add_argument("--redis-requests", type=int, default=2000)
    ap.add_argument("--guard-requests", type=int, default=1000)
    ap.add_argument("--global-entries", type=int, default=100_000)
    args = ap.parse_args()
    asyncio.run(memory(args.sessions, args.real))
    if args.redis_requests:
        asyncio.run(redis_latency(args.redis_requests))
    if args.guard_requests:
        asyncio.run(guard_latency(args.guard_requests))
    if args.global_entries:
        asyncio.run(global_fill(args.global_entries))


if __name__ == "__main__":
    main()
