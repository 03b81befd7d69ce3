"""The inference call to the model: the scored bytes out, the whole answer back, over pooled keep-alive
connections.

aiohttp's ``ClientSession`` is a general client (cookies, redirects, proxies, tracing, streaming bodies); for
the one call every scored request makes, its machinery cost 80-110 µs of CPU per request, about as much as the
whole aiohttp server side (bench/proxy.py: ``floor`` vs ``floor-lean``). This client does only what that call
needs: one write per request (head and body), the answer framed by ``Content-Length``, chunked coding or the
connection's close, and the guard's deadlines. Plain ``http://`` upstreams only (a TLS upstream keeps
aiohttp's client); passthrough and OpenAI-compatible routes, which stream, keep aiohttp's client too.

What it refuses, as a 502 like aiohttp did: a status line or head it cannot read, a head over 64 KiB, a
``Content-Length`` that is not one decimal number (or two that differ), a transfer coding other than chunked,
and both ``Content-Length`` and ``Transfer-Encoding`` (request smuggling's tool). Failures carry the name of
the aiohttp error that used to describe them (``upstream_error`` in the event and the metric's ``kind`` stay
what they were).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["Answer", "UpstreamError", "UpstreamPool", "lean_pool_for"]

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256


class UpstreamError(Exception):
    """The model server could not be reached or answered with something that is not HTTP.

    ``kind`` names the failure as aiohttp's client did (``ClientConnectorError``, ``ServerDisconnectedError``,
    ``ClientPayloadError``, ``ClientResponseError``); ``reason`` is what the event says (never response bytes)."""

    def __init__(self, kind: str, reason: str | None = None) -> None:
        super().__init__(reason or kind)
        self.kind = kind
        self.reason = reason or kind


@dataclass(frozen=True, slots=True)
class Answer:
    """The model's whole answer."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    payload: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time; parses the answer as it arrives."""

    def __init__(self, read_timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False      # set once an answer ended with the connection still usable
        self.received = 0          # bytes of the current answer so far
        self._read_timeout = read_timeout
        self._buf = bytearray()
        self._waiter: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._deadline = 0.0  # loop time by which the current answer must be whole
        self._head: tuple[int, str, CIMultiDict[str], int | None, bool, bool] | None = None
        self._chunks: list[bytes] = []  # chunked body parts decoded so far
        self._bodiless = False  # the current request is HEAD: its answer has a head only

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        head = self._head
        if head is not None and head[3] is None and not head[4]:  # framed by the close: this is the end
            self._finish(bytes(self._buf), keep=False)
        elif head is None and not self.received:
            waiter.set_exception(UpstreamError("ServerDisconnectedError"))
        else:
            waiter.set_exception(UpstreamError("ClientPayloadError"))

    def send(self, data: bytes, *, deadline: float, bodiless: bool = False) -> asyncio.Future[Answer]:
        """Write one whole request; the future is the whole answer (or the reason there is none), a TimeoutError
        once the loop's clock passes ``deadline``. ``bodiless``: a HEAD request, whose answer ends with its head."""
        assert self.transport is not None
        self._bodiless = bodiless
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self.reusable = False
        self.received = 0
        self._last_read = loop.time()
        self._deadline = deadline
        self._arm(loop, min(self._last_read + self._read_timeout, deadline))
        self.transport.write(data)
        return self._waiter

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """The timer fires by ``due``: a timer already set no later is kept (when it fires, ``_check_idle`` sets it
        again for the answer then awaited), so a busy keep-alive connection makes one timer per ``read_timeout``,
        not one per request (a timer made and cancelled per request cost ~2 % of a guard-off request's
        instructions)."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timer = loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        """``read_timeout`` is the longest gap between two reads (as aiohttp's ``sock_read``); the deadline
        bounds the whole answer. One timer serves both: a per-call ``asyncio.timeout`` would cost a second
        timer, a context object and a task cancellation path on every request. It outlives the answer it was
        set for: fired between answers, it finds nothing awaited and ends."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        loop = asyncio.get_running_loop()
        due = min(self._last_read + self._read_timeout, self._deadline)
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check_idle)
            return
        waiter.set_exception(TimeoutError())
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        self.received += len(data)
        self._last_read = asyncio.get_running_loop().time()
        self._buf += data
        try:
            self._parse()
        except UpstreamError as exc:
            waiter.set_exception(exc)
            self.abort()

    def _parse(self) -> None:
        while self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise UpstreamError("ClientResponseError", "the model's answer head is too large")
                return
            if end > MAX_HEAD_BYTES:
                raise UpstreamError("ClientResponseError", "the model's answer head is too large")
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            parsed = _parse_head(head)
            if 100 <= parsed[0] < 200:  # an interim answer (100 Continue): the real one follows
                continue
            self._head = parsed
        status, _, _, length, chunked, _ = self._head
        if self._bodiless or status in (204, 304):
            self._finish(b"", keep=True)
        elif chunked:
            self._parse_chunks()
        elif length is not None and len(self._buf) >= length:
            if len(self._buf) > length:
                raise UpstreamError("ClientResponseError", "the model sent more than its Content-Length")
            self._finish(bytes(self._buf), keep=True)

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > 4096:
                    raise UpstreamError("ClientPayloadError", "malformed chunked answer")
                return
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise UpstreamError("ClientPayloadError", "malformed chunked answer")
            size = int(size_text, 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end == line_end:  # no trailers: "0\r\n\r\n"
                    trailer_end = line_end
                elif trailer_end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise UpstreamError("ClientPayloadError", "malformed chunked answer")
                    return
                if len(buf) > trailer_end + 4:
                    raise UpstreamError("ClientResponseError", "the model sent more than its chunked answer")
                self._finish(b"".join(self._chunks), keep=True)
                return
            start = line_end + 2
            if len(buf) < start + size + 2:
                return
            if buf[start + size : start + size + 2] != b"\r\n":
                raise UpstreamError("ClientPayloadError", "malformed chunked answer")
            self._chunks.append(bytes(buf[start : start + size]))
            del buf[: start + size + 2]

    def _finish(self, payload: bytes, *, keep: bool) -> None:
        assert self._head is not None
        assert self._waiter is not None
        status, reason, headers, _, _, close = self._head
        self._head = None
        self._chunks = []
        self._buf.clear()
        self.reusable = keep and not close and not self.closed
        self._waiter.set_result(Answer(status, reason, CIMultiDictProxy(headers), payload))


def _parse_head(head: bytes) -> tuple[int, str, CIMultiDict[str], int | None, bool, bool]:
    """(status, reason, headers, Content-Length or None, chunked, close after it) of one answer head."""
    decoded = head.decode("latin-1")
    breaks = decoded.count("\r\n")
    if decoded.count("\r") != breaks or decoded.count("\n") != breaks or "\x00" in decoded:  # bare CR, LF or NUL
        raise UpstreamError("ClientResponseError", "the model's answer head has bare line breaks")
    lines = decoded.split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(status_text) != 3 or not status_text.isdigit():
        raise UpstreamError("ClientResponseError", "the model's answer is not HTTP/1.x")
    if len(lines) - 1 > MAX_HEADERS:
        raise UpstreamError("ClientResponseError", "the model's answer has too many header fields")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name or "\t" in name:
            raise UpstreamError("ClientResponseError", "the model's answer has a malformed header field")
        headers.add(name, value.strip(" \t"))
    lengths = {v.strip() for v in headers.getall("Content-Length", ())}
    codings = ",".join(headers.getall("Transfer-Encoding", ())).strip().lower()
    if codings and lengths:
        raise UpstreamError("ClientResponseError", "the model's answer has both Content-Length and "
                                                   "Transfer-Encoding")
    if codings and codings != "chunked":
        raise UpstreamError("ClientResponseError", "the model's answer uses a transfer coding other than chunked")
    length: int | None = None
    if lengths:
        (text,) = lengths if len(lengths) == 1 else (None,)
        if text is None or not text.isdigit() or not text.isascii() or len(text) > 15:
            raise UpstreamError("ClientResponseError", "the model's answer has an invalid Content-Length")
        length = int(text)
    tokens = {t.strip().lower() for t in ",".join(headers.getall("Connection", ())).split(",")}
    close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
    status = int(status_text)
    if length is None and not codings and status not in (204, 304) and not 100 <= status < 200:
        close = True  # framed by the connection's end
    return status, reason, headers, length, codings == "chunked", close


class UpstreamPool:
    """Keep-alive connections to one ``http://host:port``: at most ``size`` at once (a request waits for a
    free slot, within its deadline), idle ones reused newest first."""

    def __init__(self, host: str, port: int, *, size: int, connect_timeout: float, read_timeout: float) -> None:
        self._host, self._port = host, port
        shown = f"[{host}]" if ":" in host else host
        self._host_header = f"Host: {shown if port == 80 else f'{shown}:{port}'}\r\n"
        self._slots = asyncio.Semaphore(size)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[_Connection] = []

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                      timeout: float) -> Answer:
        """Send ``body`` exactly; the whole answer. Raises UpstreamError, or TimeoutError when the whole call (a
        free slot, the connect and the answer) takes longer than ``timeout`` seconds, the connect longer than
        ``connect_timeout`` or the answer pauses longer than ``read_timeout``. The headers go as given
        (aiohttp's parse of the client's, re-encoded as it read them), with ``Host``, ``Content-Length`` and,
        when absent, the two aiohttp's client added (``Accept: */*``, ``Content-Type: application/octet-stream``)."""
        head = [f"{method} {target} HTTP/1.1\r\n", self._host_header]
        accept = content_type = False
        for name, value in headers:
            lname = name.lower()
            accept = accept or lname == "accept"
            content_type = content_type or lname == "content-type"
            head.append(f"{name}: {value}\r\n")
        if not accept:
            head.append("Accept: */*\r\n")
        if not content_type:
            head.append("Content-Type: application/octet-stream\r\n")
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        data = "".join(head).encode("utf-8", "surrogateescape") + body
        bodiless = method == "HEAD"
        deadline = asyncio.get_running_loop().time() + timeout
        if self._slots.locked():  # every connection busy: wait for one within the deadline
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()  # a free slot is taken at once, without a timer
        try:
            return await self._exchange(data, deadline, bodiless)
        finally:
            self._slots.release()

    async def _exchange(self, data: bytes, deadline: float, bodiless: bool) -> Answer:
        """One request on an idle connection (or a new one) holding a slot; the connection goes back idle only
        when its answer ended cleanly."""
        conn = self._take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect_by(deadline)
        try:
            try:
                answer = await conn.send(data, deadline=deadline, bodiless=bodiless)
            except UpstreamError as exc:
                # an idle connection the server closed as it was taken: nothing of an answer came back
                if not (reused and exc.kind == "ServerDisconnectedError"):
                    raise
                conn.abort()
                conn = await self._connect_by(deadline)
                answer = await conn.send(data, deadline=deadline, bodiless=bodiless)
        except BaseException:
            conn.abort()  # timed out, cancelled or failed mid-answer: never reused
            raise
        if conn.reusable:
            self._idle.append(conn)
        elif not conn.closed:
            conn.abort()
        return answer

    async def _connect_by(self, deadline: float) -> _Connection:
        """A new connection, within the call's deadline as well as ``connect_timeout``."""
        async with asyncio.timeout_at(deadline):
            return await self._connect()

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        read_timeout = self._read_timeout
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(read_timeout), self._host, self._port)
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else type(exc).__name__
            raise UpstreamError("ClientConnectorError", f"ClientConnectorError: {why}") from exc
        return conn  # a TimeoutError (the connect took too long) is the caller's 504

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()


def lean_pool_for(upstream: str, *, size: int, connect_timeout: float, read_timeout: float) -> UpstreamPool | None:
    """The pool for a plain ``http://`` upstream; None for any other (TLS keeps aiohttp's client)."""
    parts = urlsplit(upstream)
    if parts.scheme != "http" or not parts.hostname or parts.path.rstrip("/") or parts.query:
        return None
    return UpstreamPool(parts.hostname, parts.port or 80, size=size, connect_timeout=connect_timeout,
                        read_timeout=read_timeout)

