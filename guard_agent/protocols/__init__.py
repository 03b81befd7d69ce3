"""Protocol parsers: request bodies to features, responses to predictions, and response hardening.

Everything here is pure (bytes in, dataclasses out). Request problems raise ``ProtocolError`` whose
message is safe to return in a 400; response functions never raise.
"""

from guard_agent.protocols._base import ParsedRequest, ParseLimits, ProtocolError
from guard_agent.protocols._dispatch import PROTOCOLS, parse_request
from guard_agent.protocols.hardening import HARDENABLE_PROTOCOLS, Hardening, harden_document, harden_response
from guard_agent.protocols.responses import ParsedResponse, parse_document, parse_response, read_response

__all__ = [
    "HARDENABLE_PROTOCOLS",
    "PROTOCOLS",
    "Hardening",
    "ParseLimits",
    "ParsedRequest",
    "ParsedResponse",
    "ProtocolError",
    "harden_document",
    "harden_response",
    "parse_document",
    "parse_request",
    "parse_response",
    "read_response",
]
