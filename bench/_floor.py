"""The floor of bench/proxy.py: a bare aiohttp reverse proxy with no guard logic.

The guard's own HTTP stack and nothing else: an aiohttp server with one catch-all handler, one long-lived
aiohttp ``ClientSession`` to the upstream, the body read whole and forwarded, the answer read whole and
sent back with its headers (hop-by-hop ones dropped). Whatever the guard costs above this configuration is
its own work (routing, parsing, scoring, sessions, events, metrics); what this costs is aiohttp's.

    python bench/_floor.py --port 8080 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length", "proxy-connection")
)
CLIENT = web.AppKey("client", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")

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


def main() -> None:
    p = argparse.ArgumentParser(description="bare aiohttp reverse proxy (the bench's floor)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the event loop (the guard's default is uvloop where installed)")
    args = p.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=loop_factory() if loop_factory else None)


if __name__ == "__main__":
    main()
