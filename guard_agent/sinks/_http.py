"""HTTP: batches of events POSTed to a collector with a token header.

Formats: ``ndjson`` (one event per line: Vector/Fluent Bit/Logstash http inputs),
``splunk_hec`` (``/services/collector/event``: ``{"time", "event"}`` objects) and
``elastic_bulk`` (``_bulk`` with ``create`` and an id derived from the event, so a batch
sent twice is stored once). A 2xx acknowledges the batch. Only 400 and 413 say "something
in this batch": such a batch is bisected to find the events the receiver refuses (counted
as rejected), within a budget of ``1 + 4 * ceil(log2 n)`` POSTs per attempt (enough to isolate
two bad events in any batch of n in one attempt). Parts still unresolved when the budget runs
out are never counted as rejected: the batch stays in the spool, and the next attempt (after
backoff) resumes the bisection where it stopped, without resending what was accepted. A batch
whose every event the receiver refuses is rejected at once while no more than 10 events in a
row were refused (bad events, like a single bad event); beyond that the receiver seems to refuse
everything (a configuration problem: url, index, format), so the batch is held: resent whole
with backoff up to ``HELD_ATTEMPTS`` times, then its events are counted as rejected, so the
spool behind it is never blocked for good. 401/403 re-read the token file; every other status
(5xx, 429, connection errors: a receiver that is down or busy) refuses the batch (or the part
being tried) as a whole and is retried with backoff for as long as it takes, never bisected,
and never counts as a refusal of the events.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import orjson

from guard_agent.settings import ConfigError
from guard_agent.sinks._config import HttpSinkConfig
from guard_agent.sinks._transport import DeliveryError, client_tls_context

__all__ = ["HttpTransport", "encode_batch"]

REJECT_STREAK_LIMIT = 10   # more refused events in a row than this: hold a wholly refused batch, retry it
HELD_ATTEMPTS = 10         # a held batch refused this many times in a row is counted as rejected: never stuck
BISECT_POSTS_PER_LEVEL = 4  # each halving level may cost this many POSTs: isolates two bad events exactly
_PER_EVENT = (400, 413)     # the only statuses that may concern single events; all others refuse the batch
_CONTENT_TYPE = {"ndjson": "application/x-ndjson", "splunk_hec": "application/json",
                 "elastic_bulk": "application/x-ndjson"}


def _as_object(line: bytes) -> tuple[bytes, float | None]:
    """The line if it is a JSON object (else wrapped as ``{"message": ...}``), and its @timestamp as epoch."""
    try:
        event: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        return orjson.dumps({"message": line.decode("utf-8", "replace")}), None
    try:
        ts = datetime.fromisoformat(str(event["@timestamp"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        ts = None
    return line, ts


def encode_batch(config: HttpSinkConfig, lines: Sequence[bytes]) -> bytes:
    """The request body for one batch in the configured format (events are embedded, not re-serialised)."""
    if config.format == "splunk_hec":
        parts = []
        for line in lines:
            doc, ts = _as_object(line)
            meta: dict[str, Any] = {"source": "inference-guard", "sourcetype": config.sourcetype}
            if ts is not None:
                meta["time"] = round(ts, 6)
            if config.index:
                meta["index"] = config.index
            parts.append(orjson.dumps(meta)[:-1] + b',"event":' + doc + b"}")
        return b"\n".join(parts)
    if config.format == "elastic_bulk":
        parts = []
        for line in lines:
            doc, _ = _as_object(line)
            action: dict[str, Any] = {"_id": hashlib.sha256(doc).hexdigest()[:40]}
            if config.index:
                action["_index"] = config.index
            parts.append(orjson.dumps({"create": action}) + b"\n" + doc + b"\n")
        return b"".join(parts)
    return b"\n".join(lines) + b"\n"


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    value = resp.getheader("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class _Bisection:
    """The search for refused events in one batch, kept across attempts so a spent budget loses nothing.

    ``parts``: index ranges not resolved yet, in batch order; ``rejected``: events refused alone (or
    bulk item errors) so far.
    """

    lines: tuple[bytes, ...]
    parts: list[tuple[int, int]]
    rejected: int = 0
    held: int = 0    # every event refused, beyond the streak limit: attempts so far (then resent whole)


class _HTTPSConnection(http.client.HTTPConnection):
    """HTTPS that verifies ``server_name`` (which may differ from the host connected to)."""

    default_port = 443

    def __init__(self, host: str, port: int, *, timeout: float, tls: ssl.SSLContext, server_name: str) -> None:
        super().__init__(host, port, timeout=timeout)
        self._tls = tls
        self._server_name = server_name

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


class HttpTransport:
    """One keep-alive connection (http.client: the sender is a plain thread, no event loop)."""

    def __init__(self, config: HttpSinkConfig) -> None:
        self.config = config
        parts = urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._tls = client_tls_context(config.tls) if config.tls is not None else None
        self._conn: http.client.HTTPConnection | None = None
        self._token = config.read_token()
        self._reject_streak = 0
        self._pending: _Bisection | None = None   # the batch being bisected, resumed when it is sent again

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._tls is not None:
                server_name = self.config.tls.server_name if self.config.tls is not None else None
                self._conn = _HTTPSConnection(self._host, self._port, timeout=self.config.timeout,
                                              tls=self._tls, server_name=server_name or self._host)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.config.timeout)
        return self._conn

    def _post(self, body: bytes) -> tuple[int, bytes, float | None]:
        c = self.config
        headers = {"Content-Type": _CONTENT_TYPE[c.format], "User-Agent": "inference-guard"}
        headers.update(dict(c.headers))
        if self._token:
            headers[c.token_header] = f"{c.token_scheme} {self._token}".strip()
        try:
            conn = self._connection()
            conn.request("POST", self._path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DeliveryError(f"POST {self._host}:{self._port}: {type(exc).__name__}: {exc}") from None
        if resp.will_close:
            self.close()
        return resp.status, data, _retry_after(resp)

    def send(self, lines: Sequence[bytes]) -> int:
        batch = tuple(lines)
        pending = self._pending
        if pending is not None and pending.held and pending.lines == batch:
            return self._resend_held(pending)
        rejected = self._send(batch)
        if rejected < len(batch):
            self._reject_streak = 0
            return rejected
        self._reject_streak += rejected
        if self._reject_streak <= REJECT_STREAK_LIMIT:   # bad events: rejected like a single bad event
            return rejected
        # the receiver refuses everything (a bad url, index or mapping?): hold the batch a while, not forever
        held = self._pending = _Bisection(batch, [], rejected=rejected, held=1)
        raise self._held_error(held)

    def _resend_held(self, held: _Bisection) -> int:
        """One more whole attempt of a held batch; its events are rejected after ``HELD_ATTEMPTS`` refusals."""
        n = len(held.lines)
        status, data, retry_after = self._answer(held.lines)
        if 200 <= status < 300:
            rejected = self._accepted(data)
            if rejected < n:        # the receiver takes events again
                self._pending = None
                self._reject_streak = 0
                return rejected
        elif status not in _PER_EVENT:
            self._refused(status, retry_after)   # down or busy (5xx, 429...): not a refusal, kept spooled
        held.held += 1
        self._reject_streak += n
        if held.held >= HELD_ATTEMPTS:
            self._pending = None
            return n                # counted as rejected and announced by the worker; the spool moves on
        raise self._held_error(held)

    def _held_error(self, held: _Bisection) -> DeliveryError:
        return DeliveryError(f"receiver refused every event of a batch of {len(held.lines)} and each of the last "
                             f"{self._reject_streak} events (HTTP 400/413 or bulk item errors): check url, index "
                             f"and format; retrying the batch (attempt {held.held} of {HELD_ATTEMPTS}), then "
                             "counting its events as rejected")

    def _send(self, lines: tuple[bytes, ...]) -> int:
        n = len(lines)
        posts = 1 + BISECT_POSTS_PER_LEVEL * math.ceil(math.log2(max(n, 1)))   # per attempt
        budget = posts
        pending = self._pending
        if pending is None or pending.lines != lines:   # a new batch (the worker resends the same tuple)
            self._pending = None
            budget -= 1
            status, data, retry_after = self._answer(lines)
            if 200 <= status < 300:
                return self._accepted(data)
            if status not in _PER_EVENT:
                self._refused(status, retry_after)
            if n == 1:
                return 1
            pending = self._pending = _Bisection(lines, [(0, n // 2), (n // 2, n)])
        self._bisect(pending, budget)   # raises on a refusal of a whole part (429, 5xx...): the state is kept
        if pending.parts:               # budget spent: resolve the rest on the next attempt, never discard it
            left = sum(hi - lo for lo, hi in pending.parts)
            raise DeliveryError(f"receiver refused parts of a batch of {n} events (HTTP 400/413); {left} events "
                                f"not resolved within {posts} POSTs: keeping them spooled, resuming later")
        self._pending = None
        return pending.rejected

    def _bisect(self, bisection: _Bisection, budget: int) -> None:
        """Resolve the unresolved parts in order (depth first, so what is accepted arrives in order)."""
        parts = bisection.parts
        while parts and budget > 0:
            budget -= 1
            lo, hi = parts[0]
            status, data, retry_after = self._answer(bisection.lines[lo:hi])
            if 200 <= status < 300:
                bisection.rejected += self._accepted(data)
                parts.pop(0)
                continue
            if status not in _PER_EVENT:
                self._refused(status, retry_after)   # a part refused as a whole (429, 5xx...): resend it later
            parts.pop(0)
            if hi - lo == 1:
                bisection.rejected += 1
            else:
                mid = (lo + hi) // 2
                parts[0:0] = [(lo, mid), (mid, hi)]

    def _answer(self, lines: Sequence[bytes]) -> tuple[int, bytes, float | None]:
        return self._post(encode_batch(self.config, lines))

    def _accepted(self, data: bytes) -> int:
        return self._bulk_rejections(data) if self.config.format == "elastic_bulk" else 0

    def _refused(self, status: int, retry_after: float | None) -> NoReturn:
        if status in (401, 403):
            with contextlib.suppress(ConfigError):
                self._token = self.config.read_token()   # a rotated Secret
        raise DeliveryError(f"HTTP {status} from {self._host}:{self._port}", retry_after)

    def _bulk_rejections(self, data: bytes) -> int:
        """Elastic answers 200 with per-item errors: retry on 429/5xx items; 409 = already stored."""
        try:
            doc: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise DeliveryError("Elastic bulk answer is not JSON") from None
        if not isinstance(doc, dict) or not doc.get("errors"):
            return 0
        statuses = [int(next(iter(item.values())).get("status", 500)) for item in doc.get("items", [])]
        if any(s == 429 or s >= 500 for s in statuses):
            raise DeliveryError("Elastic bulk: some items were not stored (429/5xx), resending the batch")
        return sum(1 for s in statuses if s >= 400 and s != 409)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
