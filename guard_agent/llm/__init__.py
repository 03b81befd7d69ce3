"""OpenAI-compatible LLM endpoints: request parsing and properties, answer hardening, SSE relay, usage."""

from guard_agent.llm._harden import harden_llm_chunk, harden_llm_document, harden_llm_request
from guard_agent.llm._request import OPENAI_PROTOCOLS, parse_openai
from guard_agent.llm._stream import Usage, relay_sse, usage_of

__all__ = [
    "OPENAI_PROTOCOLS",
    "Usage",
    "harden_llm_chunk",
    "harden_llm_document",
    "harden_llm_request",
    "parse_openai",
    "relay_sse",
    "usage_of",
]
