"""Run the guard and admin listeners until SIGTERM/SIGINT; SIGHUP reloads the policy.

The guard listener is hardened below aiohttp: every connection goes through a
small protocol wrapper that caps the number of open connections (each
connection handles one request at a time, so this also caps concurrency) and
cuts off clients that dribble a request head (slowloris: aiohttp itself only
times out idle connections). TLS terminates here when a certificate is set, with
certificates, API keys and the JWKS reloaded when their files change.

Shutdown drains: readiness turns false, the listeners stop accepting, in-flight
requests get up to ``shutdown_grace`` seconds, then events are flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from prometheus_client import Counter, Gauge

from guard_agent.admin import make_admin_app
from guard_agent.app import build_state, make_app
from guard_agent.auth import AuthError
from guard_agent.contracts import Reloadable
from guard_agent.events import DiagnosticsHandler, random_id
from guard_agent.proxy import error_response, handle, refuse_early
from guard_agent.settings import ConfigError, Settings, parse_hostport
from guard_agent.state import GuardState
from guard_agent.tls import TlsError, TlsReloader
from guard_agent.workers import one_native_thread

__all__ = ["ConnectionGuard", "GuardRunner", "GuardSite", "ListenError", "ParseErrorLog", "serve", "start_listeners"]

TLS_HANDSHAKE_TIMEOUT = 10.0
LINGER_SECONDS = 1.0
_EOF_SETTLE_TURNS = 8  # loop turns for a request taken off aiohttp's queue to reach its handler
CLEANUP_MARGIN = 5.0
READ_BUFFER_BYTES = 256 * 1024  # what asyncio's own transports ask of recv() per read


def _canned(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": "-"}})
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


_BUSY = _canned(503, "Service Unavailable", "overloaded", "too many open connections")
_SLOW_HEAD = _canned(408, "Request Timeout", "request_timeout", "the request headers were not received in time")


class ConnectionGuard:
    """Counts open connections and closes those whose request head does not arrive in time.

    It also owns the one read buffer every connection's socket reads go into (see ``_GuardedProtocol``).
    """

    def __init__(self, *, max_connections: int, header_timeout: float,
                 on_refuse: Callable[[str], None] = lambda reason: None,
                 answer_error: ErrorAnswer | None = None) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.on_refuse = on_refuse
        self.read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        # aiohttp's handler class for this listener: its own errors answered (and logged as events) by answer_error
        self.handler_class: type[web.RequestHandler] = type(
            "_GuardErrorHandler", (_JsonErrorHandler,), {"__slots__": (), "answer": staticmethod(
                answer_error or _plain_error_answer)})

    def wrap(self, factory: Callable[[], web.RequestHandler]) -> Callable[[], asyncio.BufferedProtocol]:
        return lambda: _GuardedProtocol(factory(), self)


ErrorAnswer = Callable[[web.BaseRequest, int, str, str], web.Response]
"""(request, status, code, message) -> the JSON error response; the guard's also writes the decision event."""


def _plain_error_answer(request: web.BaseRequest, status: int, code: str, message: str) -> web.Response:
    return error_response(status, code, message, random_id())


def _too_large(exc: BaseException | None) -> bool:
    """aiohttp's parser refuses a head with an over-long line or too many header fields as a plain 400: both are
    headers too large (431) to the client."""
    return isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message)


_ERRORS = {
    400: ("invalid_request", "malformed HTTP request"),
    408: ("request_timeout", "request timed out"),
    413: ("body_too_large", "request body too large"),
    431: ("headers_too_large", "request headers too large"),
    500: ("internal_error", "internal error"),
    504: ("upstream_timeout", "the model server did not answer in time"),
}
"""Codes and messages of the errors aiohttp answers itself, as the proxy words them (never the client's bytes)."""


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's request handler, answering its own errors (a request its HTTP parser refused, a handler that
    failed) in the JSON error format of DESIGN.md instead of aiohttp's plain text, which quotes the refused
    header line back. Logging (see ParseErrorLog) and the refusal to answer twice are aiohttp's.

    Adds no state (``__slots__ = ()``), so ``_GuardedProtocol`` can give aiohttp's handler this class."""

    __slots__ = ()
    answer: ErrorAnswer = staticmethod(_plain_error_answer)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; ConnectionError if a response was half sent
        if status == 400 and _too_large(exc):
            status = 431
        code, text = _ERRORS.get(status, ("invalid_request", "request refused") if status < 500
                                 else ("internal_error", "internal error"))
        response = self.answer(request, status, code, text)
        response.force_close()
        return response


class _GuardedProtocol(asyncio.BufferedProtocol):
    """Forwards to aiohttp's request handler; adds the connection cap and the head deadline.

    A head is "in progress" when bytes arrived while the handler waits for a request
    (or before the first request on the connection was parsed). If no new request
    has been parsed ``header_timeout`` seconds later, the client gets 408 and the
    connection is closed. Bodies have their own timeout in the proxy.

    Reads are buffered (``get_buffer``/``buffer_updated``) into the guard's one shared buffer and handed on
    as bytes of exactly the size received. A plain ``Protocol`` makes asyncio allocate 256 KiB per read and
    shrink it; glibc serves those from the heap (its mmap threshold rises past 256 KiB once a process has
    freed a big block), and long-lived allocations made meanwhile (a new session's tracker arrays) land in
    the freed tails: under header fuzzing with new sessions, RSS grew ~3.5 KB per request and was never
    returned (docs/hardening.md). Sharing one buffer is safe: the transport fills it and calls
    ``buffer_updated`` synchronously, on the loop's thread, before any other read.
    """

    def __init__(self, inner: web.RequestHandler, guard: ConnectionGuard) -> None:
        if type(inner) is web.RequestHandler:
            inner.__class__ = guard.handler_class  # same layout, our handle_error (aiohttp has no hook for it)
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._counted = False
        self._timer: asyncio.TimerHandle | None = None
        self._snapshot = 0
        self._cut = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._guard.open >= self._guard.max_connections:
            self._guard.on_refuse("connections")
            transport.write(_BUSY)
            transport.close()
            return
        self._guard.open += 1
        self._counted = True
        self._inner.connection_made(transport)
        # a connection that never sends a byte must meet the same head deadline as a slow one
        self._timer = asyncio.get_running_loop().call_later(self._guard.header_timeout, self._deadline)

    # aiohttp's RequestHandler has no public view of these three: its private slots ``_request_count``,
    # ``_waiter`` and ``_current_request`` are read here (tests/integration/test_listener_internals.py checks
    # that the pinned aiohttp still has them with these meanings)

    def _parsed(self) -> int:
        return self._inner._request_count

    def _awaiting_head(self) -> bool:
        waiter = self._inner._waiter
        return self._parsed() == 0 or (waiter is not None and not waiter.done())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._guard.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._counted and not self._cut:  # bytes after a refusal or a cut are dropped without a copy
            self.data_received(bytes(self._guard.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if not self._counted or self._cut:
            return
        before = self._parsed()
        self._inner.data_received(data)
        if self._parsed() != before and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and self._parsed() == before and self._awaiting_head():
            self._snapshot = before
            self._timer = asyncio.get_running_loop().call_later(self._guard.header_timeout, self._deadline)

    def _deadline(self) -> None:
        self._timer = None
        transport = self._transport
        if self._parsed() == self._snapshot and self._awaiting_head() and transport is not None:
            self._guard.on_refuse("slow_headers")
            self._cut = True
            with contextlib.suppress(Exception):
                transport.write(_SLOW_HEAD)
            if transport.can_write_eof():  # lingering close: let the client read the 408 before it sees a reset
                transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
            else:
                transport.close()

    def eof_received(self) -> bool | None:
        """A client that half-closes after its request still gets the answer.

        At EOF the write side stays open until it is clear what the connection is doing: idle, or gone mid-body,
        it is closed (the handler sees the client gone); answering a whole request, aiohttp takes no new
        ones and closes once it is answered. The request handler may not have started yet when the EOF arrives
        (it is a task of its own), so this is settled a few loop turns later.
        """
        if not self._counted:
            return None
        self._inner.eof_received()
        asyncio.get_running_loop().call_soon(self._settle_eof, _EOF_SETTLE_TURNS)
        return True

    def _settle_eof(self, turns: int) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        current = self._inner._current_request
        waiter = self._inner._waiter
        if current is None and waiter is None and turns > 0:  # a request taken off the queue, not yet started
            asyncio.get_running_loop().call_soon(self._settle_eof, turns - 1)
        elif current is not None and current.content.is_eof():
            self._inner.close()  # no new requests; aiohttp closes the connection after this answer
        else:
            transport.close()

    def pause_writing(self) -> None:
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._guard.open -= 1
            self._inner.connection_lost(exc)


class GuardRunner(web.AppRunner):
    """The guard port's runner: the application's lifecycle (its ``cleanup_ctx``: session store, upstream client,
    watchers) as ``AppRunner`` runs it, and every request straight to ``proxy.handle`` through aiohttp's low-level
    ``Server``. The application's router, the ``web.Request`` it makes and the URL it parses cost ~4 % of a
    request's instructions (bench/proxy.py's guard-off, under callgrind), and the guard's route table reads the raw
    path itself."""

    def __init__(self, app: web.Application, state: GuardState, *, handle_signals: bool = False,
                 shutdown_timeout: float = 60.0, **kwargs: Any) -> None:
        super().__init__(app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, **kwargs)
        self._state = state
        self._server_kwargs = kwargs

    async def _make_server(self) -> web.Server:
        await super()._make_server()  # the application's start-up; the server it would serve with is not used
        return web.Server(partial(handle, self._state), loop=asyncio.get_running_loop(), **self._server_kwargs)


class GuardSite(web.TCPSite):
    """A TCP site whose connections pass through a ``ConnectionGuard`` (and TLS, when given)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 1024, reuse_port: bool = False) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog, reuse_address=True,
                         reuse_port=reuse_port)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.wrap(server), self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self._ssl_context else None)


class ParseErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's connection logger for the guard port: a request its HTTP parser refused is counted, not logged.

    aiohttp logs each such request at ERROR with a traceback whose message quotes the offending raw header
    line (an API key or bearer token included) or its first 100 bytes: raw client input in the logs, and one
    traceback per malformed packet under fuzzing. The client still gets a 400 (JSON, see ``_JsonErrorHandler``)
    and the connection is closed. Every other record (a bug in a handler, say) goes to ``aiohttp.server`` unchanged.
    """

    def __init__(self, on_malformed: Callable[[], None]) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))
        self._on_malformed = on_malformed

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), HttpProcessingError):
            self._on_malformed()
            return
        super().log(level, msg, *args, **kwargs)


class _ListenerMetrics:
    def __init__(self, state: GuardState) -> None:
        r = state.metrics.registry
        self.refused = Counter("inference_guard_connections_refused_total",
                               "Connections closed by the guard: over the cap, a request head too slow, "
                               "or a request the HTTP parser refused", ["reason"], registry=r)
        self.reloads = Counter("inference_guard_credential_reloads_total",
                               "Reloads of TLS certificates, API keys and the JWKS", ["file", "result"], registry=r)
        self.open = Gauge("inference_guard_open_connections", "Open connections on the guard port", registry=r)


def _reload_watcher(state: GuardState, metrics: _ListenerMetrics, reloadables: list[tuple[str, Reloadable]]
                    ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(state.settings.reload_interval)
                for name, item in reloadables:
                    try:
                        changed = item.maybe_reload()
                    except (AuthError, TlsError) as exc:
                        metrics.reloads.labels(name, "failed").inc()
                        state.events.log("error", f"{name} rejected: last good kept", error={"message": str(exc)})
                        continue
                    except Exception as exc:  # a bug or an unforeseen error must not end reloads for good
                        metrics.reloads.labels(name, "failed").inc()
                        state.events.log("error", f"{name} reload failed unexpectedly: last good kept, retrying",
                                         error={"message": f"{type(exc).__name__}: {exc}"[:500]})
                        continue
                    if changed:
                        metrics.reloads.labels(name, "ok").inc()
                        state.events.log("info", f"{name} reloaded")

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


async def start_listeners(state: GuardState) -> tuple[web.AppRunner, web.AppRunner]:
    """Start both listeners; returns their runners (the caller cleans them up).

    Raises ConfigError for bad listener or TLS settings (credentials are checked by ``build_state``).
    """
    s = state.settings
    tls: TlsReloader | None = None
    if s.tls_cert_file or s.tls_key_file:
        if not (s.tls_cert_file and s.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file must be set together")
        try:
            tls = TlsReloader(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        except TlsError as exc:
            raise ConfigError(str(exc)) from exc
    elif s.tls_client_ca_file:
        raise ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
    metrics = _ListenerMetrics(state)
    guard = ConnectionGuard(
        max_connections=s.max_connections,
        header_timeout=min(s.header_read_timeout, s.client_read_timeout),
        on_refuse=lambda reason: metrics.refused.labels(reason).inc(),
        answer_error=lambda request, status, code, message: refuse_early(state, request, status, code, message))
    metrics.open.set_function(lambda: guard.open)
    app = make_app(state)
    reloadables = [*([("tls", tls)] if tls is not None else []), *state.credential_files]
    if reloadables:
        app.cleanup_ctx.append(_reload_watcher(state, metrics, reloadables))
    guard_runner = GuardRunner(app, state, access_log=None, handle_signals=False,
                                 max_field_size=max(8190, s.max_header_bytes * 2),
                                 max_line_size=max(8190, s.max_header_bytes * 2),
                                 keepalive_timeout=75, shutdown_timeout=s.shutdown_grace,
                                 logger=ParseErrorLog(lambda: metrics.refused.labels("malformed_request").inc()))
    admin_runner = web.AppRunner(make_admin_app(state), access_log=None, handle_signals=False)
    await guard_runner.setup()
    await admin_runner.setup()
    try:
        host, port = parse_hostport(s.listen)
        with _naming(s.listen):
            await GuardSite(guard_runner, host, port, guard=guard, ssl_context=tls.context if tls else None,
                            reuse_port=s.workers > 1).start()  # GUARD_WORKERS: the workers share the guard port
        ahost, aport = parse_hostport(s.admin_listen)
        with _naming(s.admin_listen):
            await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
    except BaseException:  # a port in use, say: nothing of the half-started guard is left running
        await admin_runner.cleanup()
        await guard_runner.cleanup()
        raise
    return guard_runner, admin_runner


class ListenError(OSError):
    """A listener could not bind; ``strerror`` is one line naming the address (``cannot listen on ...: why``)."""


@contextlib.contextmanager
def _naming(address: str) -> Iterator[None]:
    """Re-raise a bind failure as a ListenError naming the configured address, errno kept."""
    try:
        yield
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ListenError(exc.errno or 0, f"cannot listen on {address}: {why}") from exc


GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds while serving (CPython's default is 700, 10, 10)."""


def settle_heap() -> None:
    """Take what start-up built (modules, the profile, the policy) out of the cyclic collector's view, and let it
    run less often.

    A request allocates a few thousand objects (coroutines, futures, dicts), nearly all freed by reference
    counting; at CPython's default threshold the collector still runs every ~700 allocations and, every hundred
    runs, walks every object in the heap, start-up's included. Frozen (``gc.freeze``), those are never walked
    again; at the higher thresholds a collection runs every few requests instead of several times per request.
    Cycles are still collected, only later. bench/proxy.py measured about 5% less CPU per request with both."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: Settings) -> int:
    one_native_thread()  # numpy on the loop thread: BLAS threads only compete with it
    state = build_state(settings)
    DiagnosticsHandler(state.events).install()  # stdout stays one JSON object per line
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: state.reloader.policy("sighup"))
    try:
        guard_runner, admin_runner = await start_listeners(state)
    except BaseException:  # sinks with a flush thread or task must not keep a process that never served alive
        state.events.close()
        raise
    state.events.log("info", "guard started", guard={"listen": settings.listen, "admin_listen": settings.admin_listen,
                                                     "upstream": settings.upstream,
                                                     "tls": bool(settings.tls_cert_file),
                                                     "mtls": bool(settings.tls_client_ca_file),
                                                     "policy_revision": state.policies.current.revision,
                                                     "profile_revision": state.profile.revision})
    settle_heap()
    if not state.upstream_ok:  # said once at start; /readyz stays 503 and inference gets 502 until it answers
        state.events.log("warning", f"the model server at {settings.upstream} is not reachable: requests get 502 "
                                    "until it is", guard={"upstream": settings.upstream})
    await stop.wait()
    state.shutting_down = True
    state.events.log("info", "guard stopping: draining in-flight requests", guard={"in_flight": state.in_flight})
    for site in list(guard_runner.sites):
        await site.stop()
    deadline = loop.time() + settings.shutdown_grace
    while state.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    drained = state.in_flight == 0
    cleaned = True
    try:  # a component whose teardown never finishes must not keep the pod alive past its grace period
        async with asyncio.timeout(settings.shutdown_grace + CLEANUP_MARGIN):
            await guard_runner.cleanup()
            await admin_runner.cleanup()
    except TimeoutError:
        cleaned = False
        state.events.log("error", "guard shutdown: cleanup did not finish in time, exiting anyway")
    state.events.log("info" if drained and cleaned else "warning", "guard stopped",
                     guard={"in_flight": state.in_flight, "drained": drained, "cleaned_up": cleaned})
    state.events.close()
    return 0 if cleaned else 1
