"""Syslog sinks against a real rsyslogd (imtcp, and gtls for TLS) that each test starts on a free port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests._support.sinks import (
    Rsyslog,
    event_line,
    gauge,
    in_order_without_gaps,
    make_certs,
    make_fanout,
    needs_rsyslog,
    sink_count,
    wait_for,
)
from tests.conftest import free_port

pytestmark = [needs_rsyslog, pytest.mark.slow]
RECEIVER_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sinks" / "rsyslog-receiver.conf"
FAST = {"retry_initial": 0.05, "retry_max": 0.3, "timeout": 2.0}


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    """A plain-TCP rsyslogd on a free loopback port, up for the whole test."""
    with Rsyslog(tmp_path / "rsyslog") as r:
        yield r


def syslog_sink(port: int, **extra: object) -> dict[str, object]:
    return {"type": "syslog", "name": "rsyslog", "host": "127.0.0.1", "port": port, **FAST, **extra}


class TestSyslogTcp:
    async def test_rfc5424_fields_as_rsyslog_parses_them(self, rsyslog: Rsyslog, tmp_path: Path) -> None:
        """rsyslog sees severity from the level (alerts at most warning), MSGID = action, the event's own time."""
        f = make_fanout(tmp_path / "spool", syslog_sink(rsyslog.port))
        lines = [event_line(0), event_line(1, action="block", kind="alert"), event_line(2, level="error")]
        for line in lines:
            f.sink.write(line)
        await wait_for(lambda: len(rsyslog.ids()) == 3)
        f.sink.close(5)
        records = rsyslog.records()
        assert [r["event"] for r in records] == [orjson.loads(line) for line in lines]
        assert [r["severity"] for r in records] == [6, 4, 3]
        assert [r["msgid"] for r in records] == ["allow", "block", "allow"]
        assert {r["facility"] for r in records} == {"16"} and {r["app"] for r in records} == {"inference-guard"}
        assert [r["timestamp"] for r in records] == [orjson.loads(line)["@timestamp"] for line in lines]

    async def test_many_events_in_order(self, rsyslog: Rsyslog, tmp_path: Path) -> None:
        """2000 events arrive exactly once each and in order over one connection (octet-counted framing)."""
        f = make_fanout(tmp_path / "spool", syslog_sink(rsyslog.port))
        for i in range(2000):
            f.sink.write(event_line(i))
        await wait_for(lambda: len(rsyslog.ids()) >= 2000)
        f.sink.close(5)
        assert rsyslog.ids() == [f"req-{i}" for i in range(2000)]
        assert sink_count(f.metrics, "rsyslog", "delivered") == 2000

    async def test_rsyslog_restart_under_steady_rate(self, rsyslog: Rsyslog, tmp_path: Path) -> None:
        """rsyslog stopped for a second under 200 events/s, then restarted: every event arrives, in order."""
        f = make_fanout(tmp_path / "spool", syslog_sink(rsyslog.port))
        n, rate = 600, 200.0
        start = time.monotonic()
        for i in range(n):
            f.sink.write(event_line(i))
            if i == 150:
                await asyncio.to_thread(rsyslog.stop)
            if i == 350:
                await wait_for(lambda: gauge(f.metrics, "inference_guard_sink_up", "rsyslog") == 0)
                await asyncio.to_thread(rsyslog.start)
            await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        await wait_for(lambda: len(set(rsyslog.ids())) == n, timeout=20)
        f.sink.close(5)
        assert in_order_without_gaps(rsyslog.ids(), n)
        assert sink_count(f.metrics, "rsyslog", "dropped") == 0
        assert f.status_events("sink_down") and f.status_events("sink_up")


class TestSyslogTls:
    async def test_delivery_over_tls(self, tmp_path: Path) -> None:
        """RFC 5425: the sink verifies rsyslog's certificate against the given CA and delivers over TLS."""
        certs = make_certs(tmp_path)
        r = Rsyslog(tmp_path / "rsyslog-tls", certs=certs)
        with r:
            f = make_fanout(tmp_path / "spool", syslog_sink(r.port, tls=True, ca_file=str(certs.ca),
                                                             server_name="localhost"))
            for i in range(300):
                f.sink.write(event_line(i))
            await wait_for(lambda: len(r.ids()) >= 300)
            f.sink.close(5)
        assert r.ids() == [f"req-{i}" for i in range(300)]

    async def test_untrusted_certificate_is_refused_and_events_kept(self, tmp_path: Path) -> None:
        """With a CA that did not sign rsyslog's certificate nothing is sent; events stay spooled, sink is down."""
        certs = make_certs(tmp_path)
        r = Rsyslog(tmp_path / "rsyslog-tls", certs=certs)
        with r:
            f = make_fanout(tmp_path / "spool", syslog_sink(r.port, tls=True, ca_file=str(certs.other_ca)))
            for i in range(10):
                f.sink.write(event_line(i))
            await wait_for(lambda: bool(f.status_events("sink_down")))
            await asyncio.sleep(0.3)
            f.sink.close(1)
        assert r.records() == []
        assert "certificate" in f.status_events("sink_down")[0]["guard"]["reason"].lower()
        assert sink_count(f.metrics, "rsyslog", "delivered") == 0
        assert f.status_events("sink_spool_kept")[0]["guard"]["backlog"] == {"rsyslog": 10}

    async def test_client_certificate_for_mtls(self, tmp_path: Path) -> None:
        """rsyslog requiring a client certificate (x509/certvalid) accepts the sink only with cert_file/key_file."""
        certs = make_certs(tmp_path)
        r = Rsyslog(tmp_path / "rsyslog-mtls", certs=certs, require_client_cert=True)
        with r:
            without = make_fanout(tmp_path / "spool-a", syslog_sink(r.port, name="no-cert", tls=True,
                                                                    ca_file=str(certs.ca), server_name="localhost"))
            without.sink.write(event_line(0))
            await wait_for(lambda: sink_count(without.metrics, "no-cert", "delivered") == 1
                           or bool(without.status_events("sink_down")))
            without.sink.close(1)
            with_cert = make_fanout(tmp_path / "spool-b", syslog_sink(
                r.port, name="with-cert", tls=True, ca_file=str(certs.ca), server_name="localhost",
                cert_file=str(certs.client_cert), key_file=str(certs.client_key)))
            for i in range(1, 51):
                with_cert.sink.write(event_line(i))
            await wait_for(lambda: len(r.ids()) >= 50)
            with_cert.sink.close(5)
        assert r.ids() == [f"req-{i}" for i in range(1, 51)], "the sink without a client certificate got nothing in"
        assert sink_count(without.metrics, "no-cert", "delivered") == 0


class TestReceiverExample:
    async def test_example_rsyslog_config_receives_and_splits_alerts(self, tmp_path: Path) -> None:
        """examples/sinks/rsyslog-receiver.conf (paths and port swapped for the test) takes the sink's TLS
        stream, parses the JSON and writes alerts to their own file."""
        certs = make_certs(tmp_path)
        port = free_port()
        logs = tmp_path / "logs"
        logs.mkdir()
        conf = (RECEIVER_EXAMPLE.read_text()
                .replace("/etc/rsyslog.d/tls/ca.pem", str(certs.ca))
                .replace("/etc/rsyslog.d/tls/server.pem", str(certs.cert))
                .replace("/etc/rsyslog.d/tls/server.key", str(certs.key))
                .replace("/var/log/inference-guard", str(logs))
                .replace('port="6514"', f'port="{port}" address="127.0.0.1"')
                .replace("global(\n", f'global(\n  workDirectory="{tmp_path}"\n'))
        r = Rsyslog(tmp_path / "example", port=port)
        r.start(config=conf)
        try:
            f = make_fanout(tmp_path / "spool", syslog_sink(port, tls=True, ca_file=str(certs.ca),
                                                             server_name="localhost"))
            lines = [event_line(0), event_line(1, action="block", kind="alert"), event_line(2)]
            for line in lines:
                f.sink.write(line)
            events = logs / "events.jsonl"
            await wait_for(lambda: events.exists() and len(events.read_bytes().splitlines()) == 3)
            f.sink.close(5)
        finally:
            r.stop()
        assert [orjson.loads(x) for x in events.read_bytes().splitlines()] == [orjson.loads(x) for x in lines]
        alerts = [orjson.loads(x) for x in (logs / "alerts.jsonl").read_bytes().splitlines()]
        assert [a["http"]["request"]["id"] for a in alerts] == ["req-1"]

