"""Raw HTTP/1.1 over a socket, for requests no client library would send (bad framing, odd paths, slow bodies)."""

from __future__ import annotations

import asyncio


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed, as the guard answers)."""
    async with asyncio.timeout(timeout):
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("closed before a response")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def exchange(port: int, data: bytes, timeout: float = 10.0, *,
                   source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is on a new connection to 127.0.0.1:``port`` (from loopback address ``source`` when
    given, e.g. ``127.0.3.9``, so the guard sees a client of its own) and read one response."""
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()


def port_of(url: str) -> int:
    """The port of an ``http://127.0.0.1:PORT`` URL."""
    return int(url.rsplit(":", 1)[1])


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the guard sends until it closes the connection; fails if it stays open longer."""
    async with asyncio.timeout(seconds):
        return await reader.read()
