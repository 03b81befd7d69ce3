"""``parse_request``: one entry point that picks the protocol parser and enforces the shared rules."""

from __future__ import annotations

from guard_agent.llm._request import OPENAI_PROTOCOLS, parse_openai
from guard_agent.protocols._base import ParsedRequest, ParseLimits, ProtocolError, TextInput
from guard_agent.protocols._json import check_content_encoding
from guard_agent.protocols.mlflow import parse_mlflow
from guard_agent.protocols.pointer import parse_custom
from guard_agent.protocols.text import parse_text_request
from guard_agent.protocols.v1 import parse_v1
from guard_agent.protocols.v2 import parse_v2

__all__ = ["PROTOCOLS", "parse_request", "parse_request_unguarded"]

PROTOCOLS = ("v2", "v1", "mlflow", "custom", "openai.chat", "openai.completions", "openai.embeddings")
_DEFAULT_LIMITS = ParseLimits()


def parse_request_unguarded(
    protocol: str,
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    pointer: str | None = None,
    limits: ParseLimits = _DEFAULT_LIMITS,
    inference_header_length: int | None = None,
) -> ParsedRequest:
    """``parse_request`` without the last-resort exception net (tests use it to find real bugs).

    The numeric parsers first; the text parser when they met strings (``TextInput``)."""
    check_content_encoding(content_encoding)
    if inference_header_length is not None and protocol != "v2":
        raise ProtocolError("the binary tensor extension (Inference-Header-Content-Length) is v2 only")
    try:
        return _parse_numeric(protocol, body, content_type, pointer, limits, inference_header_length)
    except TextInput:
        return parse_text_request(protocol, body, content_type=content_type, pointer=pointer, limits=limits,
                                  inference_header_length=inference_header_length)


def _parse_numeric(protocol: str, body: bytes, content_type: str | None, pointer: str | None, limits: ParseLimits,
                   inference_header_length: int | None) -> ParsedRequest:
    if protocol == "v2":
        return parse_v2(body, content_type=content_type, limits=limits,
                        inference_header_length=inference_header_length)
    if protocol == "v1":
        return parse_v1(body, content_type=content_type, limits=limits)
    if protocol == "mlflow":
        return parse_mlflow(body, content_type=content_type, limits=limits)
    if protocol == "custom":
        return parse_custom(body, pointer=pointer, content_type=content_type, limits=limits)
    if protocol in OPENAI_PROTOCOLS:
        return parse_openai(protocol, body, content_type=content_type, limits=limits)
    raise ProtocolError("unknown protocol")


def parse_request(
    protocol: str,
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    pointer: str | None = None,
    limits: ParseLimits = _DEFAULT_LIMITS,
    inference_header_length: int | None = None,
) -> ParsedRequest:
    """Parse one inference request body into a 2-D float64 feature matrix, or raise ProtocolError.

    ``protocol`` is ``RouteMatch.protocol``; ``pointer`` is ``RouteMatch.pointer`` for custom routes;
    ``inference_header_length`` is the v2 ``Inference-Header-Content-Length`` header as an int (the
    caller answers 400 itself when the header is not a decimal integer). The ProtocolError message is
    safe to return in a 400: it never echoes input values.
    """
    try:
        return parse_request_unguarded(
            protocol, body, content_type=content_type, content_encoding=content_encoding, pointer=pointer,
            limits=limits, inference_header_length=inference_header_length)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
        # Defence in depth: the parsers are written (and fuzzed) not to get here.
        raise ProtocolError("malformed request") from None
