"""HTTP between the client, the guard and the model: which headers go on, reading the client's body, calling
the model within a deadline, and the answer when the model fails."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from guard_agent.proxy.outcome import Outcome, error_response
from guard_agent.proxy.upstream import UpstreamError
from guard_agent.state import GuardState

__all__ = ["HOP_BY_HOP", "BadBody", "ClientGone", "SlowClient", "call_upstream", "client_headers", "read_body",
           "upstream_deadline", "upstream_failure", "upstream_headers", "upstream_target"]


HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Proxy-Connection",
))


# Expect is answered by the guard itself (the body is read whole before anything is forwarded): forwarded, it
# would make the upstream client wait for a "100 Continue" the model server may never send
_NOT_FORWARDED = HOP_BY_HOP | {"expect"}


# the headers the guard parsed and decided with: the upstream must read the body the same way, so naming one in
# ``Connection`` (which makes it hop-by-hop) does not remove it (``Connection: close, Content-Type`` would
# otherwise forward a JSON body as application/octet-stream)
_DECIDED_WITH = frozenset({"content-type", "content-encoding", "inference-header-content-length", "authorization"})


def _upstream_headers(headers: CIMultiDictProxy[str], peer: str | None, request_id: str,
                      session_header: str) -> CIMultiDict[str]:
    connection = headers.get("Connection")
    dropped = (_NOT_FORWARDED | _named_by(connection, session_header)) if connection else _NOT_FORWARDED
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in dropped:
            out.add(name, value)
    prior = headers.get("X-Forwarded-For")
    if peer:
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Request-Id"] = request_id
    return out


def _named_by(connection: str, session_header: str) -> frozenset[str]:
    """The fields a ``Connection`` header names (hop-by-hop, not forwarded), but those the guard decided with."""
    tokens = {t.strip().lower() for t in connection.split(",")}
    tokens.discard("")
    return frozenset(tokens - _DECIDED_WITH - {session_header.lower()})


def client_headers(headers: Mapping[str, str], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    out["X-Request-Id"] = request_id
    return out


class SlowClient(Exception):
    """The client did not send its body within the read timeout."""


class ClientGone(Exception):
    """The client closed the connection before its whole body arrived: nothing to score, nobody to answer."""


class BadBody(Exception):
    """The body cannot be read as sent (bad framing, or an encoding the guard will not decode)."""


async def read_body(request: web.BaseRequest, limit: int, timeout: float) -> bytes | None:
    """The whole body, or None when it exceeds ``limit`` (checked before and while reading)."""
    # every Content-Encoding header and every token of each: aiohttp decompresses by one of them while a model
    # server may read another, so anything but identity (in any position, repeated or listed) is refused
    headers = request.headers
    if "Content-Encoding" in headers:  # one lookup for the usual request, which names no coding at all
        _refuse_content_codings(headers.getall("Content-Encoding"))
    if "Transfer-Encoding" in headers and ",".join(headers.getall("Transfer-Encoding")).strip().lower() not in (
            "", "chunked"):
        # aiohttp decodes only the chunked framing; any other transfer-coding would be forwarded undecoded
        raise BadBody("unsupported Transfer-Encoding: only chunked framing is accepted")
    if request.content_length is not None and request.content_length > limit:
        return None
    content = request.content
    if content.is_eof():  # the whole body came with the head (the usual small request): no timer, no iterator
        try:
            body = content.read_nowait(-1)
        except aiohttp.web_protocol.RequestPayloadError as exc:
            raise BadBody("the request body could not be read (malformed framing)") from exc
        return body if len(body) <= limit else None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
    except TimeoutError as exc:
        raise SlowClient from exc
    except ConnectionResetError as exc:
        raise ClientGone from exc
    except aiohttp.web_protocol.RequestPayloadError as exc:
        raise BadBody("the request body could not be read (malformed framing)") from exc
    return b"".join(chunks)


def _refuse_content_codings(values: list[str]) -> None:
    """BadBody unless every token of every Content-Encoding header is ``identity`` (or empty)."""
    encodings = [t.strip().lower() for v in values for t in v.split(",")]
    if any(c not in ("", "identity") for c in encodings):
        # aiohttp would decompress it; the guard refuses instead of scoring bytes other than those forwarded
        shown = ", ".join(encodings)[:48]
        raise BadBody(f"unsupported Content-Encoding {shown!r}: send an uncompressed body")


def upstream_target(request: web.BaseRequest, strip_query: bool) -> str:
    """The request target the model gets: the client's raw one, its query string dropped when asked."""
    return request.raw_path.partition("?")[0] if strip_query else request.raw_path


def upstream_headers(state: GuardState, request: web.BaseRequest, request_id: str, *,
                     readable: bool) -> CIMultiDict[str]:
    """The client's headers as the model gets them; ``readable`` asks for an uncompressed answer the guard can
    parse and harden."""
    headers = _upstream_headers(request.headers, request.remote, request_id, state.settings.session_header)
    if readable:
        headers["Accept-Encoding"] = "identity"
    return headers


async def call_upstream(state: GuardState, request: web.BaseRequest, body: bytes | None,
                        request_id: str, *, readable: bool = False,
                        strip_query: bool = False) -> aiohttp.ClientResponse:
    """Forward to the model through aiohttp's client (streamed answers: passthrough, OpenAI-compatible routes;
    every call to a TLS upstream)."""
    assert state.client is not None
    url = state.settings.upstream.rstrip("/") + upstream_target(request, strip_query)
    headers = upstream_headers(state, request, request_id, readable=readable)
    async with asyncio.timeout(upstream_deadline(state)):  # a pool slot, the connect and the answer's head
        return await state.client.request(request.method, url, data=body, allow_redirects=False,
                                          auto_decompress=False, headers=headers)


def upstream_deadline(state: GuardState) -> float:
    """The longest the guard waits on the upstream for one step (the head, or a whole inference answer).

    aiohttp's ``sock_read`` only bounds the gap between two reads and nothing bounds the wait for a pool slot:
    a model server that never answers (or waits for a ``100 Continue``) would otherwise hold a connection and
    every request queued behind it forever.
    """
    return state.settings.connect_timeout + state.settings.read_timeout


def upstream_failure(state: GuardState, out: Outcome, exc: BaseException, request_id: str) -> web.Response:
    """502/504; the event says the request failed and why (``guard.upstream_error``), at warning level."""
    out.outcome = "failure"
    if isinstance(exc, asyncio.TimeoutError):
        state.metrics.upstream_errors.labels("timeout").inc()
        out.fields["upstream_error"] = "timeout"
        return error_response(504, "upstream_timeout", "the model server did not answer in time", request_id)
    if isinstance(exc, UpstreamError):
        state.metrics.upstream_errors.labels(exc.kind).inc()
        out.fields["upstream_error"] = exc.reason
    else:
        state.metrics.upstream_errors.labels(type(exc).__name__).inc()
        out.fields["upstream_error"] = _upstream_reason(exc)
    return error_response(502, "upstream_unavailable", "the model server is unreachable or broken", request_id)


def _upstream_reason(exc: BaseException) -> str:
    """The exception's type and, for a refused or reset connection, the OS reason (never response bytes)."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else None
    if cause is not None and cause.errno:
        return f"{type(exc).__name__}: {os.strerror(cause.errno).lower()}"
    return type(exc).__name__
