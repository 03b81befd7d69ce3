"""The inference call's own client (``guard_agent.proxy.upstream``) against raw TCP servers that answer in every
framing HTTP/1.1 allows, and in some it does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from guard_agent.proxy.upstream import UpstreamError, UpstreamPool, lean_pool_for

Reply = Callable[[bytes], bytes | None]  # the request's bytes -> what the server writes (None: close at once)


class RawServer:
    """Answers each request with ``reply(request)``; remembers every request and counts connections."""

    def __init__(self, reply: Reply, *, close_after: bool = False) -> None:
        self.reply = reply
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                               if ln.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.reply(request)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    return
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[RawServer, UpstreamPool]]]]:
    servers: list[RawServer] = []
    pools: list[UpstreamPool] = []

    async def start(reply: Reply, *, close_after: bool = False, size: int = 8,
                    read_timeout: float = 5.0) -> tuple[RawServer, UpstreamPool]:
        server = RawServer(reply, close_after=close_after)
        await server.start()
        servers.append(server)
        pool = UpstreamPool("127.0.0.1", server.port, size=size, connect_timeout=2.0, read_timeout=read_timeout)
        pools.append(pool)
        return server, pool

    yield start
    for pool in pools:
        pool.close()
    for server in servers:
        server.close()


def fixed(answer: bytes) -> Reply:
    return lambda _request: answer


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}"
BODY = b'{"inputs": []}'
HEADERS = [("Content-Type", "application/json"), ("X-Request-Id", "r1")]
TIMEOUT = 10.0  # the whole call: generous, these answers come at once


class TestRequest:
    async def test_sends_the_exact_body_with_host_and_length(self, serve) -> None:  # type: ignore[no-untyped-def]
        """One request as the model receives it: the target, the headers given, Host, Content-Length, the
        headers aiohttp's client added (Accept, a default Content-Type only when absent), then the exact bytes."""
        server, pool = await serve(fixed(OK))
        answer = await pool.request("POST", "/v2/models/m/infer?x=1", HEADERS, BODY, timeout=TIMEOUT)
        assert (answer.status, answer.reason, answer.payload) == (200, "OK", b'{"a": true}')
        assert answer.headers["content-type"] == "application/json"
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v2/models/m/infer?x=1 HTTP/1.1"
        assert f"Host: 127.0.0.1:{server.port}".encode() in lines
        assert b"Content-Length: 14" in lines and b"Accept: */*" in lines and b"X-Request-Id: r1" in lines
        assert [ln for ln in lines if ln.lower().startswith(b"content-type")] == [b"Content-Type: application/json"]
        assert body == BODY
        await pool.request("POST", "/x", [("X-A", "1")], b"", timeout=TIMEOUT)
        assert b"Content-Type: application/octet-stream" in server.requests[1].split(b"\r\n")

    async def test_keep_alive_reuses_one_connection(self, serve) -> None:  # type: ignore[no-untyped-def]
        """Sequential requests share one connection."""
        server, pool = await serve(fixed(OK))
        for _ in range(5):
            assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).status == 200
        assert server.connections == 1

    async def test_concurrent_requests_stay_within_the_pool_size(self, serve) -> None:  # type: ignore[no-untyped-def]
        """Twenty at once through a pool of two: all answered, over at most two connections."""
        server, pool = await serve(fixed(OK), size=2)
        answers = await asyncio.gather(*(pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT) for _ in range(20)))
        assert {a.status for a in answers} == {200}
        assert server.connections <= 2

    async def test_connection_close_is_not_reused(self, serve) -> None:  # type: ignore[no-untyped-def]
        """``Connection: close`` in the answer: the next request opens a new connection."""
        answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        server, pool = await serve(fixed(answer), close_after=True)
        for _ in range(3):
            assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).payload == b"ok"
        assert server.connections == 3

    async def test_idle_connection_closed_by_the_server_is_replaced(self, serve) -> None:  # type: ignore[no-untyped-def]
        """A server that closes after each answer (without saying so): the next request gets a fresh
        connection, not a ServerDisconnectedError."""
        server, pool = await serve(fixed(OK), close_after=True)
        for _ in range(3):
            assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).status == 200
            await asyncio.sleep(0.05)
        assert server.connections == 3


class TestFraming:
    @pytest.mark.parametrize(("answer", "payload"), [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
         b"hello world"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n", b"abc"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", b"abc"),
    ], ids=["chunked", "chunked-trailer", "interim-100", "204", "empty", "repeated-length"])
    async def test_answers_read_whole(self, serve, answer: bytes, payload: bytes) -> None:  # type: ignore[no-untyped-def]
        """Every framing of a whole answer gives its payload, and the connection is reused after it."""
        server, pool = await serve(fixed(answer))
        for _ in range(2):
            assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).payload == payload
        assert server.connections == 1

    async def test_answer_framed_by_close(self, serve) -> None:  # type: ignore[no-untyped-def]
        """No length, no chunking: the body is what comes until the server closes."""
        _, pool = await serve(fixed(b"HTTP/1.0 200 OK\r\n\r\nall of it"), close_after=True)
        assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).payload == b"all of it"

    async def test_answer_in_pieces(self, serve) -> None:  # type: ignore[no-untyped-def]
        """An answer that arrives a few bytes at a time is put together."""

        async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(BODY))
            for i in range(0, len(OK), 7):
                writer.write(OK[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.close()

        server = await asyncio.start_server(dribble, "127.0.0.1", 0)
        pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], size=2, connect_timeout=2.0,
                            read_timeout=5.0)
        try:
            assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).payload == b'{"a": true}'
        finally:
            pool.close()
            server.close()

    @pytest.mark.parametrize(("answer", "kind"), [
        (b"\x00\xff garbage\r\n\r\n", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nX-Bad\nInjected: 1\r\nContent-Length: 0\r\n\r\n", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", "ClientResponseError"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "ClientPayloadError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "ClientPayloadError"),
        (None, "ServerDisconnectedError"),
    ], ids=["garbage", "length-and-chunked", "two-lengths", "negative-length", "gzip-coding", "bare-lf",
            "more-than-length", "bad-chunk", "short", "closed"])
    async def test_broken_answers_raise(self, serve, answer: bytes | None, kind: str) -> None:  # type: ignore[no-untyped-def]
        """What is not a whole, unambiguous HTTP/1.x answer is an UpstreamError named as aiohttp's client
        named it."""
        _, pool = await serve(fixed(answer) if answer is not None else lambda _r: None, close_after=True)
        with pytest.raises(UpstreamError) as caught:
            await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)
        assert caught.value.kind == kind


class TestFailures:
    async def test_refused_connection_names_the_os_reason(self) -> None:
        """Nothing listening: ClientConnectorError with the OS's reason, as the event says it."""
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        pool = UpstreamPool("127.0.0.1", port, size=2, connect_timeout=2.0, read_timeout=5.0)
        with pytest.raises(UpstreamError) as caught:
            await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)
        assert caught.value.kind == "ClientConnectorError"
        assert caught.value.reason == "ClientConnectorError: connection refused"

    async def test_silence_longer_than_read_timeout(self, serve) -> None:  # type: ignore[no-untyped-def]
        """A server that never answers: TimeoutError after read_timeout, and its connection is closed."""
        server, pool = await serve(lambda _r: b"", read_timeout=0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)
        assert 0.25 < loop.time() - t0 < 1.5
        await asyncio.sleep(0.1)
        assert server.connections == 1 and not pool._idle  # closed on our side, never put back

    async def test_whole_call_deadline_before_read_timeout(self, serve) -> None:  # type: ignore[no-untyped-def]
        """A server that never answers within the call's own timeout (shorter than read_timeout): TimeoutError at
        the deadline, and the connection is never reused."""
        _, pool = await serve(lambda _r: b"", read_timeout=5.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", HEADERS, BODY, timeout=0.3)
        assert 0.25 < loop.time() - t0 < 1.5
        assert not pool._idle

    async def test_deadline_covers_the_wait_for_a_slot(self, serve) -> None:  # type: ignore[no-untyped-def]
        """With every connection busy, a call that gets no slot before its deadline is a TimeoutError; the
        slot it never took stays free for the next."""
        _, pool = await serve(lambda _r: b"", read_timeout=5.0, size=1)
        busy = asyncio.ensure_future(pool.request("POST", "/", HEADERS, BODY, timeout=0.6))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", HEADERS, BODY, timeout=0.2)
        with pytest.raises(TimeoutError):
            await busy
        assert not pool._slots.locked()


    async def test_timer_kept_from_an_earlier_answer_bounds_the_next_one(self, serve) -> None:  # type: ignore[no-untyped-def]
        """On a keep-alive connection the timer set for one answer is kept for the next: firing early (the first
        answer's due time), it must neither time out the second answer then nor let it wait past read_timeout."""
        answers = iter([OK])
        server, pool = await serve(lambda _r: next(answers, b""), read_timeout=0.4)
        loop = asyncio.get_running_loop()
        assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).status == 200
        await asyncio.sleep(0.25)
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)
        assert 0.35 < loop.time() - t0 < 1.5
        assert server.connections == 1

    async def test_shorter_deadline_than_the_kept_timer(self, serve) -> None:  # type: ignore[no-untyped-def]
        """A call whose deadline comes before the timer kept from the previous answer times out at its deadline."""
        answers = iter([OK])
        server, pool = await serve(lambda _r: next(answers, b""), read_timeout=5.0)
        loop = asyncio.get_running_loop()
        assert (await pool.request("POST", "/", HEADERS, BODY, timeout=TIMEOUT)).status == 200
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", HEADERS, BODY, timeout=0.3)
        assert 0.25 < loop.time() - t0 < 1.5
        assert server.connections == 1


class TestPoolFor:
    @pytest.mark.parametrize(("url", "plain"), [
        ("http://127.0.0.1:8081", True), ("http://model:8081/", True), ("http://[::1]:8081", True),
        ("https://model:8443", False), ("http://model:8081/prefix", False),
    ])
    def test_plain_http_only(self, url: str, plain: bool) -> None:
        """The guard's own client serves plain ``http://host:port`` upstreams; TLS or a path prefix keep aiohttp's."""
        pool = lean_pool_for(url, size=4, connect_timeout=1.0, read_timeout=1.0)
        assert (pool is not None) is plain


class TestHead:
    async def test_head_answer_has_no_body(self, serve) -> None:  # type: ignore[no-untyped-def]
        """A HEAD answer's Content-Length describes a body that is not sent: the answer ends with its head."""
        server, pool = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"))
        for _ in range(2):
            answer = await asyncio.wait_for(pool.request("HEAD", "/", HEADERS, b"", timeout=TIMEOUT), 2.0)
            assert (answer.status, answer.payload, answer.headers["Content-Length"]) == (200, b"", "50")
        assert server.connections == 1
