"""The floor of bench/proxy.py: a bare aiohttp reverse proxy with no guard logic.

The guard's own HTTP stack and nothing else: an aiohttp server with one catch-all handler, one long-lived
aiohttp ``ClientSession`` to the upstream, the body read whole and forwarded, the answer read whole and
sent back with its headers (hop-by-hop ones dropped). Whatever the guard costs above this configuration is
its own work (routing, parsing, scoring, sessions, events, metrics); what this costs is aiohttp's.

    python bench/_floor.py --port 8080 --upstream http://127.0.0.1:8081

``--client lean`` swaps aiohttp's client for ``_LeanClient``: a pool of keep-alive connections, each request one
write, each answer read by Content-Length. Not a general HTTP client (no chunked answers, no TLS, no timeouts):
a measurement of what aiohttp's client costs per request next to the least a forward can do in Python.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length", "proxy-connection")
)
CLIENT = web.AppKey("client", aiohttp.ClientSession)


class _LeanConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream: one request at a time, its answer framed by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: tuple[int, str, list[tuple[str, str]], int] | None = None
        self._waiter: asyncio.Future[tuple[int, str, list[tuple[str, str]], bytes]] | None = None
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("upstream closed the connection"))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, str, list[tuple[str, str]], bytes]]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            _, status, reason = [*lines[0].split(" ", 2), ""][:3]
            headers = [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
            length = next(int(v) for k, v in headers if k.lower() == "content-length")
            self._head = (int(status), reason, headers, length)
        status, reason, headers, length = self._head
        if len(self._buf) >= length and self._waiter is not None:
            body = bytes(self._buf[:length])
            del self._buf[:length]
            self._head = None
            self._waiter.set_result((status, reason, headers, body))


class _LeanClient:
    """Idle connections in a list; a request takes one (or opens one) and gives it back after the answer."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._hostport = f"{self._host}:{self._port}".encode()
        self._idle: list[_LeanConnection] = []

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = self._idle.pop() if self._idle else None
        if conn is None or conn.broken:
            _, conn = await asyncio.get_running_loop().create_connection(_LeanConnection, self._host, self._port)
        head = [f"{method} {target} HTTP/1.1\r\nHost: ".encode(), self._hostport,
                f"\r\nContent-Length: {len(body)}\r\n".encode()]
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
        answer = await conn.send(b"".join(head) + b"\r\n" + body)
        if not conn.broken:
            self._idle.append(conn)
        return answer

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()


LEAN = web.AppKey("lean", _LeanClient)


def make_app(upstream: str, client: str = "aiohttp") -> web.Application:
    base = upstream.rstrip("/")
    if client == "lean":
        return _make_lean_app(upstream)

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app[CLIENT].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with request.app[CLIENT].request(request.method, base + request.raw_path, data=body,
                                               headers=headers, allow_redirects=False) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            return web.Response(status=up.status, reason=up.reason, body=payload, headers=out)

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def _make_lean_app(upstream: str) -> web.Application:
    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[LEAN] = _LeanClient(upstream)
        yield
        app[LEAN].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        status, reason, up_headers, payload = await request.app[LEAN].request(request.method, request.raw_path,
                                                                               headers, body)
        out = [(k, v) for k, v in up_headers if k.lower() not in _HOP]
        return web.Response(status=status, reason=reason, body=payload, headers=out)

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="bare aiohttp reverse proxy (the bench's floor)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the event loop")
    p.add_argument("--client", choices=("aiohttp", "lean"), default="aiohttp",
                   help="the upstream client: aiohttp's ClientSession (as the guard) or the lean measurement one")
    args = p.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    web.run_app(make_app(args.upstream, args.client), host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=loop_factory() if loop_factory else None)


if __name__ == "__main__":
    main()
