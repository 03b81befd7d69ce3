"""A real guard with syslog and HTTP sinks: receivers stopped and restarted under steady traffic lose nothing.

The guard is built the way ``guard-agent run`` builds it (``build_state`` without an injected sink), so
events go to stdout and, through ``guard_agent.sinks.make_sink``, to a real rsyslogd and a real HTTP
collector. Upstream is the demo v2 model server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from guard_agent.demo import DigitsModel, v2_body
from guard_agent.settings import Settings
from guard_agent.sinks import Spool
from tests._support.servers import wait_http_ready
from tests._support.sinks import (
    HttpReceiver,
    Rsyslog,
    in_order_without_gaps,
    needs_rsyslog,
    sink_count,
    wait_for,
)
from tests.conftest import free_port

pytestmark = [needs_rsyslog, pytest.mark.slow]
INFER = "/v2/models/digits/infer"
FAST = {"retry_initial": 0.05, "retry_max": 0.3, "timeout": 2.0}


class Guard:
    """One guard process's worth of state and listeners, stopped like ``serve`` stops it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://{settings.listen}"
        self.admin_url = f"http://{settings.admin_listen}"
        self.state: Any = None
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        from guard_agent.app import build_state
        from guard_agent.server import start_listeners

        self.state = build_state(self.settings)
        self._runners = list(await start_listeners(self.state))
        await wait_for(lambda: bool(self.state.upstream_ok), timeout=5)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        await asyncio.to_thread(self.state.events.close)


def guard_settings(tmp_path: Path, upstream: str, rsyslog: Rsyslog, receiver: HttpReceiver) -> Settings:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nmode: monitor\nrules: []\n")
    token = tmp_path / "token"
    token.write_text("guard-token")
    sinks = ({"type": "syslog", "name": "rsyslog", "host": "127.0.0.1", "port": rsyslog.port, **FAST},
             {"type": "http", "name": "collector", "url": receiver.url, "token_file": str(token), **FAST})
    return Settings(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}", upstream=upstream,
                    policy=str(policy), hmac_key="test-hmac-key", admin_token="test-admin-token",
                    sinks=sinks, spool_dir=str(tmp_path / "spool"))


async def one_request(http: aiohttp.ClientSession, url: str, body: bytes, rid: str) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    async with http.post(url + INFER, data=body, headers={"X-Request-Id": rid, "X-API-Key": f"k-{rid}",
                                                          "Content-Type": "application/json"}) as resp:
        await resp.read()
        assert resp.headers["X-Request-Id"] == rid
        return rid, resp.status, time.perf_counter() - t0


def ids_of(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        rid = ((e.get("http") or {}).get("request") or {}).get("id")
        if isinstance(rid, str) and rid.startswith("req-"):
            out.append(rid)
    return out


def numbered(ids: list[str]) -> list[str]:
    """Request ids in order of their number, for comparisons that allow concurrent requests to reorder."""
    return sorted(set(ids), key=lambda r: int(r.split("-")[1]))


class TestGuardWithSinks:
    async def test_sinks_down_and_back_under_steady_traffic(self, tmp_path: Path, demo_model_url: str,
                                                            demo_model: DigitsModel,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
        """Both receivers down for 2 s of a 6 s, 50 req/s run: every request answered 200 without slowing down,
        and every request's event reaches rsyslog, the HTTP collector and stdout; nothing dropped."""
        rsyslog = Rsyslog(tmp_path / "rsyslog")
        receiver = HttpReceiver()
        await asyncio.to_thread(rsyslog.start)
        await receiver.start()
        guard = Guard(guard_settings(tmp_path, demo_model_url, rsyslog, receiver))
        await guard.start()
        body = v2_body(demo_model.X_test[:1])
        rate, duration, down_at, up_at = 50.0, 6.0, 1.5, 3.5
        tasks: list[asyncio.Task[tuple[str, int, float]]] = []
        sent_at: dict[str, float] = {}
        try:
            async with aiohttp.ClientSession() as http:
                start = time.monotonic()
                phase = "up"
                for i in range(int(rate * duration)):
                    now = time.monotonic() - start
                    if phase == "up" and now >= down_at:
                        await asyncio.to_thread(rsyslog.stop)
                        await receiver.stop()
                        phase = "down"
                    elif phase == "down" and now >= up_at:
                        await asyncio.to_thread(rsyslog.start)
                        await receiver.start()
                        phase = "back"
                    rid = f"req-{i}"
                    sent_at[rid] = now
                    tasks.append(asyncio.create_task(one_request(http, guard.url, body, rid)))
                    await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
                results = await asyncio.gather(*tasks)
                sent = [rid for rid, _, _ in results]
                await wait_for(lambda: set(ids_of(receiver.events)) >= set(sent)
                               and set(ids_of([r["event"] for r in rsyslog.records()])) >= set(sent), timeout=30)
                metrics_text = await (await http.get(guard.admin_url + "/metrics")).text()
        finally:
            await guard.stop()
            await receiver.stop()
            await asyncio.to_thread(rsyslog.stop)

        assert {status for _, status, _ in results} == {200}
        before = [lat for rid, _, lat in results if sent_at[rid] < down_at]
        during = [lat for rid, _, lat in results if down_at + 0.2 < sent_at[rid] < up_at]
        assert len(during) > 60
        after = [lat for rid, _, lat in results if sent_at[rid] > up_at + 0.5]
        with capfd.disabled():
            print("latency median/max ms: " + ", ".join(
                f"{name} {statistics.median(v) * 1e3:.1f}/{max(v) * 1e3:.1f}"
                for name, v in (("before", before), ("during outage", during), ("after", after))))
        assert max(during) < 1.0, "a request waited on a sink"

        syslog_ids = ids_of([r["event"] for r in rsyslog.records()])
        http_ids = ids_of(receiver.events)
        stdout_ids = ids_of([orjson.loads(line) for line in capfd.readouterr().out.splitlines()
                             if line.startswith("{")])
        for ids in (syslog_ids, http_ids, stdout_ids):
            assert numbered(ids) == numbered(sent), "an event is missing"
        m = guard.state.metrics
        for sink in ("rsyslog", "collector"):
            assert sink_count(m, sink, "dropped") == 0
            assert sink_count(m, sink, "delivered") >= len(sent)
        assert 'inference_guard_sink_events_total{sink="rsyslog",state="delivered"}' in metrics_text
        # per sink, events are delivered in the order the guard wrote them (stdout order)
        assert in_order_without_gaps(_renumber(http_ids, stdout_ids), len(set(stdout_ids)))
        assert in_order_without_gaps(_renumber(syslog_ids, stdout_ids), len(set(stdout_ids)))

    async def test_backlog_survives_a_guard_restart(self, tmp_path: Path, demo_model_url: str,
                                                    demo_model: DigitsModel) -> None:
        """Events spooled while the receivers were down are delivered by the next guard process, before its own."""
        rsyslog = Rsyslog(tmp_path / "rsyslog")
        receiver = HttpReceiver()
        settings = guard_settings(tmp_path, demo_model_url, rsyslog, receiver)
        body = v2_body(demo_model.X_test[:1])
        async with aiohttp.ClientSession() as http:
            first = Guard(settings)
            await first.start()
            try:
                for i in range(30):
                    assert (await one_request(http, first.url, body, f"req-{i}"))[1] == 200
            finally:
                await first.stop()
            await asyncio.to_thread(rsyslog.start)
            await receiver.start()
            second = Guard(settings)
            await second.start()
            try:
                for i in range(30, 40):
                    assert (await one_request(http, second.url, body, f"req-{i}"))[1] == 200
                await wait_for(lambda: len(set(ids_of(receiver.events))) == 40
                               and len(set(ids_of([r["event"] for r in rsyslog.records()]))) == 40, timeout=20)
            finally:
                await second.stop()
                await receiver.stop()
                await asyncio.to_thread(rsyslog.stop)
        expected = [f"req-{i}" for i in range(40)]
        assert in_order_without_gaps(ids_of(receiver.events), 40) and numbered(ids_of(receiver.events)) == expected
        assert in_order_without_gaps(ids_of([r["event"] for r in rsyslog.records()]), 40)


class TestHungReceivers:
    async def test_requests_never_wait_on_a_hung_sink(self, tmp_path: Path, demo_model_url: str,
                                                      demo_model: DigitsModel) -> None:
        """Receivers that accept connections and never answer (3 s sink timeout): requests stay fast and all 200,
        and the events pile up in the spool instead of in the request path."""
        hung: list[asyncio.StreamWriter] = []

        async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hung.append(writer)

        servers = [await asyncio.start_server(never_answer, "127.0.0.1", 0) for _ in range(2)]
        ports = [srv.sockets[0].getsockname()[1] for srv in servers]
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nmode: monitor\nrules: []\n")
        slow = {"retry_initial": 0.05, "retry_max": 0.3, "timeout": 3.0}
        settings = Settings(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}",
                            upstream=demo_model_url, policy=str(policy), hmac_key="test-hmac-key",
                            sinks=({"type": "http", "name": "hung-http", "url": f"http://127.0.0.1:{ports[0]}/in",
                                    **slow},
                                   {"type": "syslog", "name": "hung-syslog", "host": "127.0.0.1", "port": ports[1],
                                    "tls": True, **slow}),   # TLS handshake that never completes
                            spool_dir=str(tmp_path / "spool"))
        guard = Guard(settings)
        await guard.start()
        body = v2_body(demo_model.X_test[:1])
        try:
            async with aiohttp.ClientSession() as http:
                results = []
                for i in range(60):
                    results.append(await one_request(http, guard.url, body, f"req-{i}"))
                    await asyncio.sleep(0.05)
            m = guard.state.metrics
            assert {status for _, status, _ in results} == {200}
            assert max(lat for _, _, lat in results) < 1.5, "a request waited on a hung sink"
            for sink in ("hung-http", "hung-syslog"):
                assert sink_count(m, sink, "delivered") == 0
                assert sink_count(m, sink, "spooled") >= 60
        finally:
            t0 = time.monotonic()
            await guard.stop()
            stop_seconds = time.monotonic() - t0
            for writer in hung:
                writer.close()
            for srv in servers:
                srv.close()
        assert stop_seconds < 8.0, "shutdown must not hang on a hung sink"


class TestGuardProcess:
    async def test_guard_agent_run_with_guard_sinks_env_flushes_on_sigterm(self, tmp_path: Path, demo_model_url: str,
                                                                           demo_model: DigitsModel) -> None:
        """`guard-agent run` configured only through GUARD_SINKS/GUARD_SPOOL_DIR delivers every event and,
        on SIGTERM, flushes and exits 0 with an empty spool."""
        receiver = HttpReceiver()
        await receiver.start()
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nmode: monitor\nrules: []\n")
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {**os.environ, "GUARD_LISTEN": listen, "GUARD_ADMIN_LISTEN": admin, "GUARD_UPSTREAM": demo_model_url,
               "GUARD_POLICY": str(policy), "GUARD_HMAC_KEY": "test-hmac-key", "GUARD_SPOOL_DIR": str(tmp_path / "sp"),
               "GUARD_SINKS": f"[{{type: http, name: collector, url: '{receiver.url}', "
                              "retry_initial: 0.05, retry_max: 0.3}]"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "guard_agent.cli", "run", env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_http_ready(f"http://{admin}/readyz", lambda: proc.returncode is None, timeout=60)
            async with aiohttp.ClientSession() as http:
                body = v2_body(demo_model.X_test[:1])
                for i in range(20):
                    assert (await one_request(http, f"http://{listen}", body, f"req-{i}"))[1] == 200
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await receiver.stop()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert numbered(ids_of(receiver.events)) == [f"req-{i}" for i in range(20)]
        assert numbered(ids_of([orjson.loads(x) for x in out.splitlines() if x.startswith(b"{")])) == \
            [f"req-{i}" for i in range(20)], "stdout stays the primary sink"
        left = Spool(tmp_path / "sp" / "collector", max_bytes=1 << 20)
        left.close()
        assert left.recovered == 0, "everything was delivered before exit"

    async def test_bad_guard_sinks_refuses_to_start(self, tmp_path: Path) -> None:
        """A mistake in GUARD_SINKS stops `guard-agent run` with exit 2 and a message naming the sink and key."""
        env = {**os.environ, "GUARD_SPOOL_DIR": str(tmp_path),
               "GUARD_SINKS": "[{type: syslog, name: siem, host: h, port: 6514, tls: true, ca_fil: /x}]"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "guard_agent.cli", "run", env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2
        assert "sinks[0] (siem): unknown key(s) ca_fil" in err.decode()


def _renumber(ids: list[str], reference: list[str]) -> list[str | None]:
    """Map ids to req-<position in reference> so in-order checks follow the guard's own write order."""
    position = {rid: f"req-{k}" for k, rid in enumerate(dict.fromkeys(reference))}
    return [position.get(rid) for rid in ids]

