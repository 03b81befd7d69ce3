"""Server-sent events from an OpenAI-compatible server, relayed line by line (never the whole answer buffered),
with the usage read on the way: the ``usage`` object of the last chunk when the server sends one
(``stream_options.include_usage``), else the number of chunks that carried generated text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from guard_agent.llm._harden import harden_llm_document
from guard_agent.protocols.hardening import Hardening

__all__ = ["Usage", "relay_sse", "usage_of"]


@dataclass
class Usage:
    """Tokens of one answer; ``counted`` when the server gave no usage and chunks were counted instead."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    counted: bool = False

    def as_fields(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "usage_counted": self.counted}


def usage_of(doc: Any) -> Usage | None:
    """The ``usage`` object of an answer or chunk, when it has a valid one."""
    usage = doc.get("usage") if type(doc) is dict else None
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    if type(prompt) is not int or type(completion) is not int:
        return None
    return Usage(prompt, completion)


def _has_text(doc: Any) -> bool:
    for choice in doc.get("choices") or () if type(doc) is dict else ():
        if type(choice) is dict:
            delta = choice.get("delta")
            if (type(delta) is dict and delta.get("content")) or choice.get("text"):
                return True
    return False


async def relay_sse(request: web.BaseRequest, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str],
                    hardening: Hardening | None) -> tuple[web.StreamResponse, Usage, bool]:
    """Relay the upstream event stream to the client; returns the response, the usage and whether the stream
    completed (False: cut because a chunk could not be hardened, or the connection failed)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    usage, chunks, complete = None, 0, True
    try:
        async for line in upstream.content:
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                try:
                    doc = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    doc = None
                usage = usage_of(doc) or usage
                chunks += _has_text(doc)
                if hardening is not None:
                    if doc is None:
                        complete = False
                        break
                    try:
                        line = b"data: " + orjson.dumps(harden_llm_document(doc, hardening)) + b"\n"
                    except (ValueError, TypeError):
                        complete = False
                        break
            await response.write(line)
        if complete:
            await response.write_eof()
    except (TimeoutError, aiohttp.ClientError, ConnectionResetError):
        complete = False
    if not complete and request.transport is not None:  # a truncated stream must not look whole
        request.transport.close()
    return response, usage or Usage(0, chunks, counted=True), complete
