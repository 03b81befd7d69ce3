"""A TCP relay that delays the server's replies: a request that ran but whose answer came too late.

Redis itself cannot be made to run a command and then answer late (``CLIENT PAUSE`` holds commands
*before* they run), and that is the fault that matters for writes that are not idempotent: the client
gives up, does not know the outcome, and sends the change again. So the tests put this relay between the
client and a real Redis; the command reaches Redis at once and only the reply waits ``delay`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class DelayedReplies:
    """``async with DelayedReplies(port) as relay``: connect to ``relay.port``; set ``relay.delay`` at will."""

    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.delay = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayedReplies:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pump(client_r, server_w, late=False), self._pump(server_r, client_w, late=True))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (client_w, server_w):
                w.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, late: bool) -> None:
        while data := await reader.read(65536):
            if late and self.delay:
                await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()
        writer.close()
