"""OpenAI-compatible LLM endpoints: request parsing and properties, answer hardening, SSE relay, usage."""

from guard_agent.llm._harden import harden_llm_chunk, harden_llm_document, harden_llm_request
from guard_agent.llm._request import OPENAI_PROTOCOLS, parse_openai
from guard_agent.llm._session import LLM_SESSION_FACTS, account, carried, llm_session_facts
from guard_agent.llm._stream import Usage, relay_sse, usage_of

__all__ = [
    "LLM_SESSION_FACTS",
    "OPENAI_PROTOCOLS",
    "Usage",
    "account",
    "carried",
    "harden_llm_chunk",
    "harden_llm_document",
    "harden_llm_request",
    "llm_session_facts",
    "parse_openai",
    "relay_sse",
    "usage_of",
]
