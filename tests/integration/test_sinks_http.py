"""HTTP sinks against a real local collector (aiohttp on loopback): delivery, outages, retries, limits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guard_agent.settings import ConfigError
from guard_agent.sinks._config import HttpSinkConfig, parse_sinks
from guard_agent.sinks._http import HttpTransport
from guard_agent.sinks._transport import DeliveryError
from tests._support.sinks import (
    HttpReceiver,
    event_line,
    gauge,
    make_certs,
    make_fanout,
    sink_count,
    wait_for,
)

FAST = {"retry_initial": 0.05, "retry_max": 0.2, "timeout": 2.0}


@pytest.fixture
async def receiver() -> AsyncIterator[HttpReceiver]:
    """An ndjson collector on a free loopback port, up for the whole test."""
    async with HttpReceiver() as r:
        yield r


def http_transport(receiver: HttpReceiver, tmp_path: Path, **extra: object) -> HttpTransport:
    """The transport alone (blocking; run it in a thread), configured as the sink would be."""
    (config,) = parse_sinks([http_sink(receiver, tmp_path, **extra)], str(tmp_path / "spool"))
    assert isinstance(config, HttpSinkConfig)
    return HttpTransport(config)


def http_sink(receiver: HttpReceiver, tmp_path: Path, **extra: object) -> dict[str, object]:
    token = tmp_path / "token"
    if not token.exists():
        token.write_text("s3cret-token\n")
    return {"type": "http", "name": "collector", "url": receiver.url, "format": receiver.fmt,
            "token_file": str(token), **FAST, **extra}


class TestHttpDelivery:
    async def test_every_event_arrives_in_order_with_the_token_header(self, receiver: HttpReceiver,
                                                                       tmp_path: Path) -> None:
        """All lines reach the collector once each, in write order, with 'Bearer <token>'; stdout gets them too."""
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        for i in range(300):
            assert f.sink.write(event_line(i))
        await wait_for(lambda: len(receiver.ids()) == 300)
        f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(300)]
        assert set(receiver.auth_seen) == {"Bearer s3cret-token"}
        assert [e["http"]["request"]["id"] for e in f.primary if "http" in e] == receiver.ids()
        assert sink_count(f.metrics, "collector", "delivered") == 300
        assert sink_count(f.metrics, "collector", "queued") == 300
        assert sink_count(f.metrics, "collector", "dropped") == 0
        assert gauge(f.metrics, "inference_guard_sink_backlog_events", "collector") == 0

    @pytest.mark.parametrize("fmt", ["splunk_hec", "elastic_bulk"])
    async def test_splunk_and_elastic_formats(self, tmp_path: Path, fmt: str) -> None:
        """Splunk HEC gets {time, event} objects with 'Splunk <token>'; Elastic bulk gets create actions."""
        receiver = HttpReceiver(fmt=fmt, token="Splunk s3cret-token" if fmt == "splunk_hec" else "ApiKey s3cret-token")
        async with receiver:
            f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
            for i in range(50):
                f.sink.write(event_line(i))
            await wait_for(lambda: len(receiver.ids()) == 50)
            f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(50)]


class TestHttps:
    async def test_https_with_a_private_ca(self, tmp_path: Path) -> None:
        """An https:// collector is verified against ca_file; with an unrelated CA nothing is sent and the
        events stay spooled."""
        certs = make_certs(tmp_path)
        receiver = HttpReceiver(tls=certs.server_context())
        async with receiver:
            bad = make_fanout(tmp_path / "spool-bad", http_sink(receiver, tmp_path, name="bad-ca",
                                                                ca_file=str(certs.other_ca)))
            bad.sink.write(event_line(0))
            await wait_for(lambda: bool(bad.status_events("sink_down")))
            bad.sink.close(1)
            good = make_fanout(tmp_path / "spool-good", http_sink(receiver, tmp_path, ca_file=str(certs.ca),
                                                                  server_name="localhost"))
            for i in range(1, 31):
                good.sink.write(event_line(i))
            await wait_for(lambda: len(receiver.ids()) == 30)
            good.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(1, 31)]
        assert "certificate" in bad.status_events("sink_down")[0]["guard"]["reason"].lower()
        assert bad.status_events("sink_spool_kept")[0]["guard"]["backlog"] == {"bad-ca": 1}


class TestHttpOutage:
    async def test_collector_down_then_up_loses_nothing(self, tmp_path: Path) -> None:
        """Events written while the collector is down are spooled, announced, and all delivered after it returns."""
        receiver = HttpReceiver()
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        for i in range(200):
            f.sink.write(event_line(i))
        await wait_for(lambda: sink_count(f.metrics, "collector", "spooled") == 200)
        await wait_for(lambda: gauge(f.metrics, "inference_guard_sink_up", "collector") == 0)
        assert sink_count(f.metrics, "collector", "delivered") == 0
        assert gauge(f.metrics, "inference_guard_sink_backlog_events", "collector") == 200
        assert f.status_events("sink_down"), "the outage must be announced on stdout"
        async with receiver:
            for i in range(200, 250):
                f.sink.write(event_line(i))
            await wait_for(lambda: len(receiver.ids()) >= 250)
            f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(250)]
        assert f.status_events("sink_up")
        assert sink_count(f.metrics, "collector", "dropped") == 0
        failures = f.metrics.registry.get_sample_value("inference_guard_sink_send_failures_total",
                                                       {"sink": "collector"})
        assert failures is not None and failures >= 1

    async def test_retry_after_and_5xx_are_retried(self, receiver: HttpReceiver, tmp_path: Path) -> None:
        """Three 503s with Retry-After, then success: every event once, in order, nothing rejected."""
        receiver.fail_status, receiver.fail_times, receiver.retry_after = 503, 3, "0.1"
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        for i in range(20):
            f.sink.write(event_line(i))
        await wait_for(lambda: len(receiver.ids()) == 20)
        f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(20)]
        assert receiver.requests >= 4
        assert sink_count(f.metrics, "collector", "rejected") == 0

    async def test_rotated_token_file_is_picked_up(self, receiver: HttpReceiver, tmp_path: Path) -> None:
        """After a 401 the token file is read again, so rotating the Secret ends the outage without a restart."""
        receiver.token = "Bearer new-token"
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        f.sink.write(event_line(0))
        await wait_for(lambda: receiver.requests >= 2)
        assert receiver.events == []
        (tmp_path / "token").write_text("new-token")
        await wait_for(lambda: len(receiver.ids()) == 1)
        f.sink.close(5)
        assert "Bearer s3cret-token" in receiver.auth_seen
        assert "s3cret-token" not in str(f.primary), "tokens must never reach the logs"

    async def test_a_refused_event_is_isolated_and_counted(self, receiver: HttpReceiver, tmp_path: Path) -> None:
        """A 400 batch is bisected: only the poison event is rejected (counted, announced), the rest delivered."""
        receiver.reject_marker = b"req-13\""
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, batch_max_events=100))
        for i in range(40):
            f.sink.write(event_line(i))
        await wait_for(lambda: sink_count(f.metrics, "collector", "delivered") == 39)
        f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(40) if i != 13]
        assert sink_count(f.metrics, "collector", "rejected") == 1
        assert f.status_events("sink_events_dropped")[0]["guard"]["reason"] == "rejected_by_receiver"

    async def test_a_collector_refusing_everything_holds_each_batch_a_bounded_time(self, receiver: HttpReceiver,
                                                                                   tmp_path: Path) -> None:
        """If every event is refused (a wrong index or mapping, or only bad events), the first 10 in a row are
        rejected like bad events; after that each batch is held (sink down, retried with backoff) for
        HELD_ATTEMPTS attempts, then rejected, so the spool keeps moving; once the collector accepts again, the
        rest arrives in order and every event is either delivered or counted as rejected."""
        receiver.reject_marker = b"req-"
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, batch_max_events=4))
        for i in range(100):
            f.sink.write(event_line(i))
        await wait_for(lambda: bool(f.status_events("sink_down")))
        assert "refused every event of a batch" in f.status_events("sink_down")[0]["guard"]["reason"]
        await wait_for(lambda: sink_count(f.metrics, "collector", "rejected") > 10)   # a held batch ended
        assert gauge(f.metrics, "inference_guard_sink_up", "collector") == 0
        assert not f.status_events("sink_up"), "rejecting a whole batch is not delivering again"
        receiver.reject_marker = None
        await wait_for(lambda: len(receiver.ids()) + sink_count(f.metrics, "collector", "rejected") == 100)
        f.sink.close(5)
        rejected = int(sink_count(f.metrics, "collector", "rejected"))
        assert receiver.ids() == [f"req-{i}" for i in range(rejected, 100)]
        assert f.status_events("sink_events_dropped")[0]["guard"]["reason"] == "rejected_by_receiver"

    async def test_a_batch_of_only_bad_events_does_not_block_later_alerts(self, tmp_path: Path) -> None:
        """20 events the receiver refuses even alone fill one batch (spooled while it was down); it is held for a
        bounded number of attempts, then counted as rejected (metric and log line), and the alerts behind it
        are delivered."""
        receiver = HttpReceiver(reject_marker=b"poison")
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, batch_max_events=20))
        for i in range(20):
            f.sink.write(event_line(i, action="poison"))
        for i in range(20, 25):
            f.sink.write(event_line(i, action="deny", level="warning"))
        await wait_for(lambda: sink_count(f.metrics, "collector", "spooled") == 25)
        f.sink.close(1)
        async with receiver:
            g = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, batch_max_events=20))
            await wait_for(lambda: len(receiver.ids()) == 5)
            g.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(20, 25)]
        assert sink_count(g.metrics, "collector", "rejected") == 20
        dropped = g.status_events("sink_events_dropped")
        assert dropped[0]["guard"] == {"sink": "collector", "reason": "rejected_by_receiver", "dropped": 20}

    async def test_a_held_batch_waits_out_a_dead_receiver(self, receiver: HttpReceiver, tmp_path: Path) -> None:
        """Single bad events: the 11th in a row is held; 503s while it is held are retried without counting as
        refusals (nothing is rejected because the receiver is down); HELD_ATTEMPTS refusals reject it."""
        receiver.reject_marker = b"poison"
        transport = http_transport(receiver, tmp_path)
        for i in range(10):
            assert await asyncio.to_thread(transport.send, [event_line(i, action="poison")]) == 1
        held = (event_line(10, action="poison"),)
        with pytest.raises(DeliveryError, match="attempt 1 of 10"):
            await asyncio.to_thread(transport.send, held)
        receiver.fail_status, receiver.fail_times = 503, 30
        for _ in range(30):
            with pytest.raises(DeliveryError, match="HTTP 503"):
                await asyncio.to_thread(transport.send, held)
        for attempt in range(2, 10):
            with pytest.raises(DeliveryError, match=f"attempt {attempt} of 10"):
                await asyncio.to_thread(transport.send, held)
        assert await asyncio.to_thread(transport.send, held) == 1
        assert await asyncio.to_thread(transport.send, [event_line(11)]) == 0   # good events: delivered
        transport.close()
        assert receiver.ids() == ["req-11"]

    async def test_a_refusing_collector_costs_a_bounded_number_of_posts(self, receiver: HttpReceiver,
                                                                        tmp_path: Path) -> None:
        """A batch of 64 refused with 400 as a whole is not bisected into 127 POSTs in one go: at most
        1 + 4*log2(64) = 25 per attempt, then it stays for a retry (DeliveryError) and nothing is rejected."""
        receiver.reject_marker = b"req-"
        transport = http_transport(receiver, tmp_path)
        with pytest.raises(DeliveryError, match="refused parts of a batch of 64 events"):
            await asyncio.to_thread(transport.send, [event_line(i) for i in range(64)])
        assert 3 <= receiver.requests <= 25
        with pytest.raises(DeliveryError):
            await asyncio.to_thread(transport.send, [event_line(i) for i in range(64)])
        transport.close()
        assert receiver.requests <= 50

    @pytest.mark.parametrize("status", [404, 422, 429, 500, 503])
    async def test_statuses_about_the_whole_batch_are_never_bisected(self, receiver: HttpReceiver, tmp_path: Path,
                                                                     status: int) -> None:
        """Any refusal other than 400/413 concerns the batch as a whole: one POST, then a retry later."""
        receiver.fail_status, receiver.fail_times = status, 1
        transport = http_transport(receiver, tmp_path)
        with pytest.raises(DeliveryError, match=f"HTTP {status}"):
            await asyncio.to_thread(transport.send, [event_line(i) for i in range(64)])
        transport.close()
        assert receiver.requests == 1

    async def test_two_bad_events_are_isolated_within_the_budget(self, receiver: HttpReceiver,
                                                                 tmp_path: Path) -> None:
        """Two refused events anywhere in a batch of 64 are found and rejected; the other 62 are delivered."""
        receiver.reject_markers = (b'"req-3"', b'"req-50"')
        transport = http_transport(receiver, tmp_path)
        rejected = await asyncio.to_thread(transport.send, [event_line(i) for i in range(64)])
        transport.close()
        assert rejected == 2
        assert receiver.ids() == [f"req-{i}" for i in range(64) if i not in (3, 50)]
        assert receiver.requests <= 25

    async def test_parts_left_when_the_budget_runs_out_are_retried_not_rejected(self, receiver: HttpReceiver,
                                                                                tmp_path: Path) -> None:
        """16 refused events (8..23) in a batch of 64 exhaust one attempt's budget; the parts not resolved yet
        (with 40 good events) are resolved on the next attempts of the same batch, never counted as rejected."""
        bad = set(range(8, 24))
        receiver.reject_markers = tuple(f'"req-{i}"'.encode() for i in bad)
        transport = http_transport(receiver, tmp_path)
        lines = tuple(event_line(i) for i in range(64))
        reasons: list[str] = []
        rejected = None
        while rejected is None and len(reasons) < 20:
            try:
                rejected = await asyncio.to_thread(transport.send, lines)
            except DeliveryError as exc:
                reasons.append(exc.reason)
        transport.close()
        assert reasons, "the first attempt must not resolve this batch (else the test proves nothing)"
        assert all("not resolved within 25 POSTs" in r for r in reasons)
        assert rejected == 16
        assert receiver.ids() == [f"req-{i}" for i in range(64) if i not in bad]
        assert receiver.requests <= 127

    async def test_a_spent_budget_loses_no_alert_through_the_sink(self, tmp_path: Path) -> None:
        """The same through the sink (the 64 events spooled while the collector was down, so they go as one
        batch): every good event is delivered in order, only the 16 bad ones are rejected."""
        bad = set(range(8, 24))
        receiver = HttpReceiver(reject_markers=tuple(f'"req-{i}"'.encode() for i in bad))
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, batch_max_events=64))
        for i in range(64):
            f.sink.write(event_line(i))
        await wait_for(lambda: sink_count(f.metrics, "collector", "spooled") == 64)
        f.sink.close(1)
        async with receiver:
            g = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, batch_max_events=64))
            await wait_for(lambda: len(receiver.ids()) == 48 and sink_count(g.metrics, "collector", "rejected") == 16)
            g.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(64) if i not in bad]
        assert sink_count(g.metrics, "collector", "rejected") == 16
        assert "not resolved within" in g.status_events("sink_down")[0]["guard"]["reason"]

    async def test_an_unforeseen_answer_does_not_stop_the_sink(self, tmp_path: Path) -> None:
        """A 200 whose body makes no sense is a failed attempt (retried), not a dead sender thread."""
        receiver = HttpReceiver(fmt="elastic_bulk", garbage_times=2)
        async with receiver:
            f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
            for i in range(5):
                f.sink.write(event_line(i))
            await wait_for(lambda: len(receiver.ids()) == 5)
            f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(5)]
        assert "AttributeError" in f.status_events("sink_down")[0]["guard"]["reason"]

    async def test_elastic_resend_is_stored_once(self, tmp_path: Path) -> None:
        """Elastic bulk ids come from the event, so a batch resent after a 429 does not duplicate documents."""
        receiver = HttpReceiver(fmt="elastic_bulk")
        async with receiver:
            f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
            lines = [event_line(i) for i in range(10)]
            for line in lines:
                f.sink.write(line)
            await wait_for(lambda: len(receiver.ids()) == 10)
            f.sink.close(5)
            g = make_fanout(tmp_path / "spool2", http_sink(receiver, tmp_path))
            for line in lines:                          # the same events again: all 409, still acknowledged
                g.sink.write(line)
            await wait_for(lambda: sink_count(g.metrics, "collector", "delivered") == 10)
            g.sink.close(5)
        assert len(receiver.ids()) == 10
        assert sink_count(g.metrics, "collector", "rejected") == 0


class TestSpoolLimits:
    async def test_full_spool_drops_newest_loudly(self, tmp_path: Path) -> None:
        """With the collector down and a 64 KiB spool, the overflow is dropped, counted and announced on stdout."""
        receiver = HttpReceiver()
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path, spool_max_bytes=64 * 1024))
        n = 600   # ~200 bytes each: about twice what fits
        for i in range(n):
            f.sink.write(event_line(i))
        await wait_for(lambda: sink_count(f.metrics, "collector", "spooled")
                       + sink_count(f.metrics, "collector", "dropped") == n)
        spooled = int(sink_count(f.metrics, "collector", "spooled"))
        dropped = int(sink_count(f.metrics, "collector", "dropped"))
        assert 0 < spooled < n and dropped == n - spooled
        spool_bytes = gauge(f.metrics, "inference_guard_sink_spool_bytes", "collector")
        assert spool_bytes is not None and spool_bytes <= 64 * 1024
        loud = f.status_events("sink_events_dropped")
        assert loud and loud[0]["log"]["level"] == "error" and loud[0]["guard"]["reason"] == "spool_full"
        async with receiver:
            await wait_for(lambda: len(receiver.ids()) == spooled)
            f.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(spooled)], "the oldest events are the ones kept"

    async def test_losses_reach_the_other_sinks_and_the_recovered_one(self, tmp_path: Path) -> None:
        """Sink a (down, tiny spool) drops: its sink_down and drop lines reach sink b's SIEM; when a returns,
        its own receiver gets a sink_up line saying how many events it lost meanwhile."""
        a, b = HttpReceiver(), HttpReceiver()
        await b.start()
        try:
            f = make_fanout(tmp_path / "spool", http_sink(a, tmp_path, name="a", spool_max_bytes=64 * 1024),
                            http_sink(b, tmp_path, name="b"))
            for i in range(600):
                f.sink.write(event_line(i))
            await wait_for(lambda: sink_count(f.metrics, "a", "spooled") + sink_count(f.metrics, "a", "dropped")
                           >= 600 and bool(b.status_events("sink_events_dropped")))
            dropped = sink_count(f.metrics, "a", "dropped")
            assert dropped > 0 and b.status_events("sink_down")[0]["guard"]["sink"] == "a"
            await a.start()
            await wait_for(lambda: bool(a.status_events("sink_up")))
            f.sink.close(5)
        finally:
            await a.stop()
            await b.stop()
        assert a.status_events("sink_up")[0]["guard"]["dropped_while_down"] == dropped
        assert a.status_events("sink_events_dropped") == [], "a sink is never told about its own drops (no loop)"
        assert b.ids() == [f"req-{i}" for i in range(600)]

    async def test_spool_is_exclusive_to_one_process(self, receiver: HttpReceiver, tmp_path: Path) -> None:
        """A second sink on the same spool directory is refused with a ConfigError, not silently shared."""
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        try:
            with pytest.raises(ConfigError, match="in use by another process"):
                make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        finally:
            f.sink.close(2)


def spool_in_child_then_sigkill(spool: Path, sink: dict[str, object], n: int) -> None:
    """A child process writes n events to a sink whose collector is down, then is killed with SIGKILL."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tests._support.sinks import make_fanout, event_line, sink_count
        f = make_fanout(Path({str(spool)!r}), {sink!r})
        for i in range({n}):
            f.sink.write(event_line(i))
        while sink_count(f.metrics, "collector", "spooled") < {n}:
            time.sleep(0.01)
        print("spooled", flush=True)
        time.sleep(60)
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"spooled"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    proc.stdout.close()


def spool_with_file_size_limit(spool: Path, sink: dict[str, object], n: int, limit: int) -> dict[str, object]:
    """A child process whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE: writes fail with EFBIG)."""
    script = textwrap.dedent(f"""
        import json, resource, signal, time
        from pathlib import Path
        from tests._support.sinks import make_fanout, event_line, sink_count
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
        f = make_fanout(Path({str(spool)!r}), {sink!r})
        for i in range({n}):
            f.sink.write(event_line(i))
        while sink_count(f.metrics, "collector", "spooled") + sink_count(f.metrics, "collector", "dropped") < {n}:
            time.sleep(0.01)
        f.sink.close(0.5)
        print(json.dumps({{"spooled": sink_count(f.metrics, "collector", "spooled"),
                          "dropped": sink_count(f.metrics, "collector", "dropped"),
                          "loud": f.status_events("sink_events_dropped")}}))
    """)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=root, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


class TestDiskErrors:
    async def test_write_errors_drop_loudly_and_keep_the_spool_intact(self, tmp_path: Path) -> None:
        """When the disk refuses writes (EFBIG), events are dropped with an error line; what was spooled
        stays whole and is delivered by the next process."""
        receiver = HttpReceiver()
        sink = http_sink(receiver, tmp_path)
        result = spool_with_file_size_limit(tmp_path / "spool", sink, 400, limit=20_000)
        spooled, dropped = int(result["spooled"]), int(result["dropped"])  # type: ignore[call-overload]
        assert spooled > 0 and dropped > 0 and spooled + dropped == 400
        loud = result["loud"]
        assert isinstance(loud, list) and loud[0]["guard"]["reason"].startswith("spool_write_error")
        async with receiver:
            g = make_fanout(tmp_path / "spool", sink)
            await wait_for(lambda: len(receiver.ids()) == spooled)
            g.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(spooled)]


class TestRestarts:
    async def test_spool_survives_a_clean_restart(self, tmp_path: Path) -> None:
        """Events spooled while the collector was down are delivered by the next process, before new ones."""
        receiver = HttpReceiver()
        f = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
        for i in range(100):
            f.sink.write(event_line(i))
        await wait_for(lambda: sink_count(f.metrics, "collector", "spooled") == 100)
        f.sink.close(1)
        assert f.status_events("sink_spool_kept")[0]["guard"]["backlog"] == {"collector": 100}
        async with receiver:
            g = make_fanout(tmp_path / "spool", http_sink(receiver, tmp_path))
            assert g.status_events("sink_spool_recovered")[0]["guard"]["backlog"] == 100
            for i in range(100, 120):
                g.sink.write(event_line(i))
            await wait_for(lambda: len(receiver.ids()) == 120)
            g.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(120)]

    async def test_spool_survives_sigkill(self, tmp_path: Path) -> None:
        """A process killed with SIGKILL loses nothing it had spooled: the next one delivers it all, in order."""
        receiver = HttpReceiver()
        sink = http_sink(receiver, tmp_path)
        spool_in_child_then_sigkill(tmp_path / "spool", sink, 500)
        async with receiver:
            g = make_fanout(tmp_path / "spool", sink)
            await wait_for(lambda: len(receiver.ids()) == 500)
            g.sink.close(5)
        assert receiver.ids() == [f"req-{i}" for i in range(500)]
