"""Hardening for LLM answers and requests: give a logit-extraction attack (Carlini et al., ICML 2024) less.

Answers (chat and completions, whole or streamed chunk by chunk): ``label_only`` strips every choice's
``logprobs``; ``top_k`` keeps the k most likely alternatives per token (``top_logprobs`` lists and the
completions API's ``top_logprobs`` dicts); ``round_digits`` rounds every log-probability. The request of a
hardened session loses its ``logit_bias`` (and, with ``label_only``, its ``logprobs``/``top_logprobs``), so the
model never applies the bias the attack sweeps. Nothing here raises: None means "could not harden".
"""

from __future__ import annotations

from typing import Any

import orjson

from guard_agent.protocols.hardening import Hardening

__all__ = ["harden_llm_chunk", "harden_llm_document", "harden_llm_request"]


def _round(value: Any, digits: int | None) -> Any:
    return round(value, digits) if digits is not None and type(value) is float else value


def _token(entry: Any, h: Hardening) -> Any:
    """One token's record: {"logprob": .., "top_logprobs": [..]} (chat) is rewritten, anything else kept."""
    if type(entry) is not dict:
        return entry
    out = dict(entry)
    if "logprob" in out:
        out["logprob"] = _round(out["logprob"], h.round_digits)
    tops = out.get("top_logprobs")
    if type(tops) is list:
        tops = tops[: max(1, h.top_k)] if h.top_k is not None else tops
        out["top_logprobs"] = [_token(t, h) for t in tops]
    return out


def _logprobs(lp: Any, h: Hardening) -> Any:
    if lp is None or h.label_only:
        return None
    if type(lp) is not dict:
        raise ValueError("logprobs is not an object")
    out = dict(lp)
    for key in ("content", "refusal"):  # chat
        if type(out.get(key)) is list:
            out[key] = [_token(t, h) for t in out[key]]
    if type(out.get("token_logprobs")) is list:  # completions
        out["token_logprobs"] = [_round(v, h.round_digits) for v in out["token_logprobs"]]
    if type(out.get("top_logprobs")) is list:
        kept = []
        for alts in out["top_logprobs"]:
            if type(alts) is dict:
                items = sorted(alts.items(), key=lambda kv: -kv[1] if type(kv[1]) is float else 0.0)
                items = items[: max(1, h.top_k)] if h.top_k is not None else items
                alts = {k: _round(v, h.round_digits) for k, v in items}
            kept.append(alts)
        out["top_logprobs"] = kept
    return out


def harden_llm_document(doc: Any, h: Hardening) -> Any:
    """A chat/completions answer or stream chunk with its log-probabilities hardened (ValueError if unreadable)."""
    if type(doc) is not dict or type(doc.get("choices", [])) is not list:
        raise ValueError("not an OpenAI answer")
    choices = [{**c, "logprobs": _logprobs(c.get("logprobs"), h)} if type(c) is dict and "logprobs" in c else c
               for c in doc.get("choices", [])]
    return {**doc, "choices": choices} if "choices" in doc else doc


def harden_llm_chunk(payload: bytes, h: Hardening) -> bytes | None:
    """One JSON answer (or SSE ``data:`` payload) hardened; None when it could not be read."""
    try:
        return orjson.dumps(harden_llm_document(orjson.loads(payload), h))
    except (ValueError, TypeError):
        return None


def harden_llm_request(body: bytes, h: Hardening) -> bytes:
    """The request without ``logit_bias`` (and without log-probability requests under ``label_only``).

    Called only for a request the guard already parsed as a JSON object."""
    doc = orjson.loads(body)
    doc.pop("logit_bias", None)
    if h.label_only:
        for key in ("logprobs", "top_logprobs"):
            doc.pop(key, None)
    elif h.top_k is not None and type(doc.get("top_logprobs")) is int:
        doc["top_logprobs"] = min(doc["top_logprobs"], max(1, h.top_k))
    return orjson.dumps(doc)
