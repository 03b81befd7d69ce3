"""Per-session LLM usage: token volume, biased tokens and log-probability requests, as facts rules can test.

Kept in the session record's ``scores`` map (persisted by the memory and Redis stores alike, last writer wins
across replicas) under ``llm.*`` keys, and carried over when the trackers replace that map. Facts:

- ``session.tokens``: prompt + completion tokens the session used (the server's ``usage``, else the text
  chunks of a stream and about 4 characters per prompt token);
- ``session.logit_bias_tokens``: token biases the session sent together with a log-probability request
  (the logit-extraction sweep of Carlini et al., ICML 2024, needs many of them);
- ``session.logprob_requests``: requests that asked for log-probabilities.

Budgets are rules over these facts, e.g. ``session.tokens: {gte: 200000}`` -> ``throttle``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from guard_agent.llm._stream import Usage
from guard_agent.protocols import ParsedRequest

__all__ = ["LLM_SESSION_FACTS", "account", "carried", "llm_session_facts"]

_KEYS = {"session.tokens": "llm.tokens", "session.logit_bias_tokens": "llm.logit_bias_tokens",
         "session.logprob_requests": "llm.logprob_requests"}
LLM_SESSION_FACTS: frozenset[str] = frozenset(_KEYS)


def llm_session_facts(held: Mapping[str, float]) -> dict[str, Any]:
    """The session facts from the record's ``scores`` map (0 for a session without LLM requests)."""
    return {fact: float(held.get(key, 0.0)) for fact, key in _KEYS.items()}


def account(held: Mapping[str, float], parsed: ParsedRequest, usage: Usage) -> dict[str, float]:
    """The ``llm.*`` entries after this request (the caller merges them into the record's map)."""
    props = parsed.properties
    prompt = usage.prompt_tokens
    if usage.counted and not prompt:
        prompt = math.ceil(sum(len(t) for t in parsed.texts) / 4)
    asks_logprobs = bool(props.get("request.logprobs") or props.get("request.top_logprobs"))
    return {
        "llm.tokens": float(held.get("llm.tokens", 0.0)) + prompt + usage.completion_tokens,
        "llm.logit_bias_tokens": float(held.get("llm.logit_bias_tokens", 0.0))
        + (float(props.get("request.logit_bias", 0)) if asks_logprobs else 0.0),
        "llm.logprob_requests": float(held.get("llm.logprob_requests", 0.0)) + asks_logprobs,
    }


def carried(held: Mapping[str, float]) -> dict[str, float]:
    """The ``llm.*`` entries of a map (kept when the trackers replace the rest)."""
    return {k: v for k, v in held.items() if k.startswith("llm.")}
