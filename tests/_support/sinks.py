"""Real receivers for the sink tests: an aiohttp HTTP collector and rsyslog processes the test starts.

The ``test_sinks_*`` modules (and the chart tests, for certificates) import these helpers.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from guard_agent.events import CallbackSink
from guard_agent.metrics import Metrics
from guard_agent.settings import Settings
from guard_agent.sinks import FanoutSink, make_sink
from tests._support.servers import free_port
from tests._support.tls import issue, make_ca
from tests._support.waiting import wait_for as poll


def sink_count(metrics: Metrics, sink: str, state: str) -> float:
    """inference_guard_sink_events_total{sink,state} (0 when absent)."""
    value = metrics.registry.get_sample_value("inference_guard_sink_events_total", {"sink": sink, "state": state})
    return value or 0.0


def gauge(metrics: Metrics, name: str, sink: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"sink": sink})


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> None:
    """Poll until ``predicate()`` holds; fail the test with a clear message otherwise."""
    if not await poll(predicate, timeout, interval):
        raise AssertionError(f"condition not met within {timeout}s")


def event_line(i: int, *, action: str = "allow", kind: str = "event", level: str = "info") -> bytes:
    """A decision-shaped event with a unique request id ``req-<i>``."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return orjson.dumps({"@timestamp": now, "log": {"level": level}, "message": f"{action} POST /infer",
                         "event": {"kind": kind, "category": ["intrusion_detection"], "action": action},
                         "http": {"request": {"id": f"req-{i}"}}})


def is_status(event: dict[str, Any]) -> bool:
    """A sink status line (sink_down, sink_up, ...) rather than a decision event."""
    return str((event.get("event") or {}).get("action", "")).startswith("sink_")


def request_id(event: dict[str, Any]) -> str | None:
    return ((event.get("http") or {}).get("request") or {}).get("id")


def in_order_without_gaps(ids: list[str | None], n: int) -> bool:
    """Every req-0..req-(n-1) present, first occurrences in order (at least once allows repeats)."""
    first: list[str | None] = []
    seen: set[str | None] = set()
    for i in ids:
        if i not in seen:
            seen.add(i)
            first.append(i)
    return first == [f"req-{i}" for i in range(n)]


@dataclass
class Fanout:
    """A FanoutSink with a primary that records lines (stdout stand-in) and its own metrics."""

    sink: FanoutSink
    metrics: Metrics
    primary: list[dict[str, Any]]

    def status_events(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.primary if (e.get("event") or {}).get("action") == action and "guard" in e]


def make_fanout(spool_dir: Path, *sinks: dict[str, Any]) -> Fanout:
    """make_sink as the guard calls it, with a recording primary instead of stdout."""
    metrics = Metrics()
    primary: list[dict[str, Any]] = []
    sink = make_sink(Settings(sinks=tuple(sinks), spool_dir=str(spool_dir)), metrics,
                     primary=CallbackSink(lambda line: primary.append(orjson.loads(line))))
    assert isinstance(sink, FanoutSink)
    return Fanout(sink, metrics, primary)


# HTTP collector --------------------------------------------------------------------------------------
@dataclass
class HttpReceiver:
    """A local collector speaking ndjson, Splunk HEC or Elastic bulk; can fail on command and be restarted."""

    port: int = field(default_factory=free_port)
    fmt: str = "ndjson"
    token: str | None = None
    fail_status: int | None = None
    fail_times: int = 0
    retry_after: str | None = None
    reject_marker: bytes | None = None
    reject_markers: tuple[bytes, ...] = ()
    garbage_times: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    auth_seen: list[str | None] = field(default_factory=list)
    requests: int = 0
    tls: ssl.SSLContext | None = None
    _runner: web.AppRunner | None = None
    _ids: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        path = {"ndjson": "/ingest", "splunk_hec": "/services/collector/event", "elastic_bulk": "/guard/_bulk"}
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path[self.fmt]}"

    def ids(self) -> list[str | None]:
        """Request ids of the decision events received, in arrival order (sink status lines left out)."""
        return [request_id(e) for e in self.events if not is_status(e)]

    def status_events(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events if is_status(e) and e["event"]["action"] == action]

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        auth = request.headers.get("Authorization")
        self.auth_seen.append(auth)
        if self.token is not None and auth != self.token:
            return web.json_response({"error": "bad token"}, status=401)
        if self.fail_times > 0 and self.fail_status is not None:
            self.fail_times -= 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": "busy"}, status=self.fail_status, headers=headers)
        if self.garbage_times > 0:          # 200 with an answer no client expects
            self.garbage_times -= 1
            return web.json_response({"errors": True, "items": ["?", 7]})
        if (self.reject_marker is not None and self.reject_marker in body) or \
                any(marker in body for marker in self.reject_markers):
            return web.json_response({"error": "invalid event"}, status=400)
        if self.fmt == "ndjson":
            assert request.content_type == "application/x-ndjson"
            self.events.extend(orjson.loads(line) for line in body.splitlines() if line)
            return web.Response(status=204)
        if self.fmt == "splunk_hec":
            for chunk in body.split(b"\n"):
                wrapper = orjson.loads(chunk)
                assert wrapper["sourcetype"] == "_json" and isinstance(wrapper["time"], float)
                self.events.append(wrapper["event"])
            return web.json_response({"text": "Success", "code": 0})
        lines = body.splitlines()
        items = []
        for action_line, doc_line in zip(lines[::2], lines[1::2], strict=True):
            doc_id = orjson.loads(action_line)["create"]["_id"]
            if doc_id in self._ids:
                items.append({"create": {"_id": doc_id, "status": 409}})
            else:
                self._ids.add(doc_id)
                self.events.append(orjson.loads(doc_line))
                items.append({"create": {"_id": doc_id, "status": 201}})
        return web.json_response({"errors": any(i["create"]["status"] != 201 for i in items), "items": items})

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.tls).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HttpReceiver:
        """``async with receiver:`` serves for the block and stops after it, however the block ends."""
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


# rsyslog ---------------------------------------------------------------------------------------------
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
needs_rsyslog = pytest.mark.skipif(not Path(RSYSLOGD).exists(),
                                   reason="rsyslogd not installed (apt-get install rsyslog rsyslog-gnutls)")

_TEMPLATE = '%syslogseverity%|%syslogfacility%|%app-name%|%msgid%|%timereported:::date-rfc3339%|%msg%\\n'


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    client_cert: Path
    client_key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate signed by it, an unrelated CA."""
    ca, other = make_ca("sink-test-ca"), make_ca("unrelated-ca")
    server = issue(ca, "localhost", server=True)
    client = issue(ca, "guard-sink", server=False, names=["guard-sink"])
    out = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "other-ca.pem",
                directory / "client.pem", directory / "client.key")
    for path, data in ((out.ca, ca.cert), (out.other_ca, other.cert), (out.cert, server.cert), (out.key, server.key),
                       (out.client_cert, client.cert), (out.client_key, client.key)):
        path.write_bytes(data)
    out.key.chmod(0o600)
    out.client_key.chmod(0o600)
    return out


@dataclass
class Rsyslog:
    """An rsyslogd the test owns: imtcp on a free loopback port (TLS via gtls when certs are given)."""

    workdir: Path
    certs: Certs | None = None
    require_client_cert: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> Path:
        return self.workdir / "received.log"

    def _config(self) -> str:
        w = self.workdir
        tls_global = tls_module = ""
        if self.certs is not None:
            tls_global = (f' defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{self.certs.ca}"'
                          f' defaultNetstreamDriverCertFile="{self.certs.cert}"'
                          f' defaultNetstreamDriverKeyFile="{self.certs.key}"')
            auth = "x509/certvalid" if self.require_client_cert else "anon"
            tls_module = f' streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="{auth}"'
        return (f'global(workDirectory="{w}" maxMessageSize="64k"{tls_global})\n'
                f'module(load="imtcp"{tls_module})\n'
                'main_queue(queue.type="Direct")\n'
                f'template(name="guard" type="string" string="{_TEMPLATE}")\n'
                f'input(type="imtcp" address="127.0.0.1" port="{self.port}")\n'
                f'action(type="omfile" file="{self.output}" template="guard" flushOnTXEnd="on" '
                'asyncWriting="off")\n')

    def start(self, timeout: float = 10.0, config: str | None = None) -> None:
        """Start rsyslogd with the generated config (or ``config``) and wait until it listens."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "rsyslog.conf"
        conf.write_text(config if config is not None else self._config())
        log = (self.workdir / "rsyslogd.out").open("ab")
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {(self.workdir / 'rsyslogd.out').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("rsyslogd did not listen in time")

    def stop(self) -> None:
        """SIGTERM and wait: rsyslog's own orderly shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> Rsyslog:
        """``with rsyslog:`` runs rsyslogd for the block and stops it after, however the block ends."""
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def records(self) -> list[dict[str, Any]]:
        """Each received message: header fields rsyslog parsed, and the event JSON."""
        if not self.output.exists():
            return []
        out = []
        for raw in self.output.read_bytes().splitlines():
            severity, facility, app, msgid, ts, msg = raw.split(b"|", 5)
            out.append({"severity": int(severity), "facility": facility.decode(), "app": app.decode(),
                        "msgid": msgid.decode(), "timestamp": ts.decode(), "event": orjson.loads(msg)})
        return out

    def ids(self) -> list[str | None]:
        """Request ids of the decision events received, in arrival order (sink status lines left out)."""
        return [request_id(r["event"]) for r in self.records() if not is_status(r["event"])]
