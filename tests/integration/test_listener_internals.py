"""The private parts of aiohttp's ``RequestHandler`` the guard listener reads (``server._GuardedProtocol``):
the connection cap, the head deadline and the half-close handling depend on them, and aiohttp may change them in
any release. Checked on a real connection over loopback, so an aiohttp upgrade that renames or repurposes
them fails here rather than in production."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests._support.servers import free_port


async def test_request_handler_private_state_means_what_the_listener_reads() -> None:
    handlers: list[web.RequestHandler] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None

    def factory() -> web.RequestHandler:
        handler = server()
        handlers.append(handler)
        return handler

    loop = asyncio.get_running_loop()
    port = free_port()
    listener = await loop.create_server(factory, "127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        (handler,) = handlers
        assert handler._request_count == 0 and handler._current_request is None
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        # one request parsed and being handled: counted, current, and the handler is not waiting for a head
        assert handler._request_count == 1
        current = handler._current_request
        assert current is not None and current.content.is_eof()
        release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        for _ in range(50):  # between requests: waiting for the next head on an unfinished future
            waiter = handler._waiter
            if waiter is not None and not waiter.done():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the idle keep-alive connection has no pending _waiter")
        assert handler._current_request is None
        writer.close()
    finally:
        listener.close()
        await listener.wait_closed()
        await runner.cleanup()
