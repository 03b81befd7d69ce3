"""What the guard relies on below aiohttp's public API still holds in the installed aiohttp.

``guard_agent/server.py`` wraps aiohttp's ``RequestHandler`` (its class is swapped for one with a JSON
``handle_error``; its ``_request_count``, ``_waiter`` and ``_current_request`` tell the head deadline and the
half-close logic what the connection is doing), starts ``GuardSite`` from ``TCPSite``'s private fields, serves
through ``GuardRunner`` (``AppRunner._make_server`` overridden), and counts parser refusals from the ``exc_info``
aiohttp logs them with. ``guard_agent/proxy/`` catches
``aiohttp.web_protocol.RequestPayloadError`` and reads ``request.version`` and ``request.transport``. An
aiohttp release that changes any of these fails here, over real loopback connections, not in production.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from guard_agent.server import ConnectionGuard, GuardSite, ParseErrorLog

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass
class _Listener:
    """A bare aiohttp server on loopback that keeps every connection's protocol object."""

    server: web.Server
    port: int
    protocols: list[Any] = field(default_factory=list)


@pytest.fixture
async def listen() -> AsyncIterator[Callable[..., Awaitable[_Listener]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, **kwargs: Any) -> _Listener:
        server = web.Server(handler, **kwargs)
        found = _Listener(server, 0)

        def factory() -> Any:
            protocol = server()
            found.protocols.append(protocol)
            return protocol

        tcp = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        servers.append(tcp)
        found.port = tcp.sockets[0].getsockname()[1]
        return found

    yield start
    for tcp in servers:
        tcp.close()
        await tcp.wait_closed()


async def _exchange(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send ``data``; return the stream and the first answer's status line and headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


class TestAiohttpInternals:
    """The private parts of aiohttp that server.py and proxy.py use exist and behave as they assume."""

    async def test_server_builds_plain_request_handlers_whose_class_can_be_swapped(self) -> None:
        """``web.Server()`` makes exactly ``web.RequestHandler``; an empty-slots subclass can replace its class."""

        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response()

        protocol = web.Server(handler)()
        assert type(protocol) is web.RequestHandler
        protocol.__class__ = type("_Sub", (web.RequestHandler,), {"__slots__": ()})
        assert isinstance(protocol, web.RequestHandler)

    def test_handle_error_keeps_its_signature(self) -> None:
        """``handle_error(request, status, exc, message)``: the override in server.py has the same parameters."""
        names = list(inspect.signature(web.RequestHandler.handle_error).parameters)
        assert names == ["self", "request", "status", "exc", "message"]

    async def test_connection_state_fields_follow_a_keepalive_connection(self, listen: Any) -> None:
        """``_request_count`` counts parsed heads, ``_current_request`` is the request being handled, and
        ``_waiter`` is a pending future while an idle keep-alive connection waits for its next head."""
        seen: list[Any] = []

        async def handler(request: web.BaseRequest) -> web.Response:
            protocol = found.protocols[0]
            seen.append((protocol._request_count, protocol._current_request is request))
            return web.Response(text="ok")

        found = await listen(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", found.port)
        try:
            await asyncio.sleep(0.05)
            protocol = found.protocols[0]
            assert protocol._request_count == 0
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head: nothing parsed yet
            await writer.drain()
            await asyncio.sleep(0.05)
            assert protocol._request_count == 0
            writer.write(b"\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            await asyncio.sleep(0.05)
            assert seen == [(1, True)]
            assert protocol._current_request is None
            assert protocol._waiter is not None and not protocol._waiter.done()
        finally:
            writer.close()

    async def test_parser_refusals_reach_handle_error_as_the_guard_classifies_them(self, listen: Any) -> None:
        """An over-long header line arrives as ``LineTooLong``, too many headers as ``BadHttpMessage`` saying
        "Too many headers"; both with status 400 (the guard answers 431 for them)."""
        errors: list[tuple[int, BaseException | None]] = []

        class Recording(web.RequestHandler):
            __slots__ = ()

            def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                             message: str | None = None) -> web.StreamResponse:
                errors.append((status, exc))
                return super().handle_error(request, status, exc, message)

        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response()

        found = await listen(handler)
        long_line = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"
        many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n"
        for data in (long_line, many):
            n = len(found.protocols)
            reader, writer = await asyncio.open_connection("127.0.0.1", found.port)
            await asyncio.sleep(0.02)
            found.protocols[n].__class__ = Recording
            writer.write(data)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.split(b" ", 2)[1] == b"400"
            writer.close()
        assert [s for s, _ in errors] == [400, 400]
        assert isinstance(errors[0][1], LineTooLong)
        assert isinstance(errors[1][1], BadHttpMessage) and "Too many headers" in errors[1][1].message

    async def test_parse_errors_are_logged_with_the_exception_as_exc_info(self, listen: Any) -> None:
        """A refused head is logged through the server's ``logger`` with ``exc_info=`` the parser's
        ``HttpProcessingError``: what ``ParseErrorLog`` counts instead of logging."""
        counted: list[int] = []

        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response()

        found = await listen(handler, logger=ParseErrorLog(lambda: counted.append(1)))
        _, writer, head = await _exchange(found.port, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        writer.close()
        assert head.split(b" ", 2)[1] == b"400"
        assert counted == [1]
        assert issubclass(LineTooLong, HttpProcessingError) and issubclass(BadHttpMessage, HttpProcessingError)

    async def test_undecodable_body_raises_request_payload_error(self, listen: Any) -> None:
        """A body aiohttp's payload parser rejects (here a corrupt gzip body) surfaces as
        ``aiohttp.web_protocol.RequestPayloadError`` from the body stream, the type proxy.py catches."""
        raised: list[type[BaseException]] = []

        async def handler(request: web.BaseRequest) -> web.Response:
            try:
                await request.content.read()
            except aiohttp.web_protocol.RequestPayloadError as exc:
                raised.append(type(exc))
            return web.Response(text="read")

        found = await listen(handler)
        _, writer = await asyncio.open_connection("127.0.0.1", found.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the handler is reading the body when the bad bytes arrive
        writer.write(b"0123456789")
        await writer.drain()
        for _ in range(100):
            if raised:
                break
            await asyncio.sleep(0.02)
        writer.close()
        assert raised == [aiohttp.web_protocol.RequestPayloadError]

    async def test_other_http_versions_reach_the_handler_with_a_transport(self, listen: Any) -> None:
        """A ``HTTP/2.0`` request line is parsed and handed on (proxy.py answers it 400 itself, on
        ``request.transport``), and its version is neither of aiohttp's HTTP/1 constants."""
        versions: list[Any] = []

        async def handler(request: web.BaseRequest) -> web.Response:
            versions.append((request.version, request.transport is not None))
            return web.Response()

        found = await listen(handler)
        _, writer, _ = await _exchange(found.port, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
        writer.close()
        assert len(versions) == 1
        version, has_transport = versions[0]
        assert has_transport
        assert version == aiohttp.HttpVersion(2, 0)
        assert version not in (aiohttp.HttpVersion10, aiohttp.HttpVersion11)

    async def test_tcp_site_keeps_what_guard_site_reads(self) -> None:
        """``TCPSite`` stores its settings in the fields ``GuardSite.start`` passes to ``create_server``, and
        ``BaseSite.start`` registers the site with its runner; the guarded site then serves."""

        async def handler(request: web.Request) -> web.Response:
            return web.Response(text="served")

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=7, reuse_address=True, reuse_port=False)
            assert (site._runner, site._host, site._port, site._ssl_context, site._backlog,
                    site._reuse_address, site._reuse_port) == (runner, "127.0.0.1", 0, None, 7, True, False)
            guard = ConnectionGuard(max_connections=8, header_timeout=5.0)
            guarded = GuardSite(runner, "127.0.0.1", 0, guard=guard)
            await guarded.start()
            assert guarded in runner.sites
            assert isinstance(guarded._server, asyncio.Server)
            port = guarded._server.sockets[0].getsockname()[1]
            async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/") as response:
                assert await response.text() == "served"
            assert guard.open in (0, 1)
        finally:
            await runner.cleanup()


    async def test_guard_runner_runs_the_lifecycle_and_serves_through_the_guard_handler(self) -> None:
        """``GuardRunner`` overrides ``AppRunner._make_server``: the application's ``cleanup_ctx`` still runs at
        setup and cleanup, and every request reaches ``proxy.handle`` (no router: an unknown path is the route
        table's 403, in the guard's JSON)."""
        import orjson

        from guard_agent.app import build_state
        from guard_agent.events import CallbackSink
        from guard_agent.proxy import handle
        from guard_agent.server import GuardRunner
        from guard_agent.settings import Settings

        state = build_state(Settings(hmac_key="unit-test-key", upstream="http://127.0.0.1:9"),
                            sink=CallbackSink(lambda line: None))
        lifecycle: list[str] = []

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            lifecycle.append("up")
            yield
            lifecycle.append("down")

        app = web.Application()
        app.cleanup_ctx.append(ctx)
        runner = GuardRunner(app, state, access_log=None)
        await runner.setup()
        try:
            assert lifecycle == ["up"]
            assert runner.server is not None and runner.server.request_handler.func is handle  # type: ignore[attr-defined]
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/nope") as response:
                assert response.status == 403
                assert orjson.loads(await response.read())["error"]["code"] == "route_not_allowed"
        finally:
            await runner.cleanup()
            state.events.close()
        assert lifecycle == ["up", "down"]
