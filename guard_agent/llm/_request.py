"""OpenAI-compatible requests (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``).

What is scored: the prompt texts (chat: every message's text content joined into one row; completions and
embeddings: one row per prompt or input string, followed by the biased token ids when ``logit_bias`` is given),
with the text features of ``detectors.text``, plus request
properties rules can test: ``request.stream``, ``request.logprobs`` (chat: 0/1; completions: the number asked),
``request.top_logprobs``, ``request.logit_bias`` (how many tokens are biased), ``request.logit_bias_max``
(the largest absolute bias) and ``request.max_tokens``.

Refused (400): token-id prompts and inputs (the guard scores text), non-text message parts (images, audio),
malformed ``logit_bias`` / ``top_logprobs`` / ``logprobs`` values. Other fields are left to the server.
"""

from __future__ import annotations

from typing import Any

from guard_agent.protocols._base import ParsedRequest, ParseLimits, ProtocolError
from guard_agent.protocols._json import loads_object, require_json
from guard_agent.protocols.text import text_request

__all__ = ["OPENAI_PROTOCOLS", "parse_openai"]

OPENAI_PROTOCOLS = frozenset({"openai.chat", "openai.completions", "openai.embeddings"})


def _texts(value: Any, where: str) -> list[str]:
    if type(value) is str:
        return [value]
    if type(value) is list and value and all(type(v) is str for v in value):
        return list(value)
    if type(value) is list and value and all(type(v) in (int, list) for v in value):
        raise ProtocolError(f"{where}: token-id prompts are not supported (send text: the guard scores text)")
    raise ProtocolError(f"{where} must be a string or a non-empty list of strings")


def _message_text(message: Any, i: int) -> str:
    where = f"messages[{i}]"
    if type(message) is not dict or type(message.get("role")) is not str:
        raise ProtocolError(f"{where} must be an object with a role")
    content = message.get("content")
    if content is None or type(content) is str:
        return content or ""
    if type(content) is not list:
        raise ProtocolError(f"{where}.content must be a string or a list of parts")
    parts = []
    for part in content:
        if type(part) is not dict or part.get("type") != "text" or type(part.get("text")) is not str:
            raise ProtocolError(f"{where}: only text content parts are accepted (the guard scores text)")
        parts.append(part["text"])
    return "\n".join(parts)


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if value is None:
        return 0
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{key} must be an integer from {lo} to {hi}")
    return value


def _properties(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    stream = doc.get("stream", False)
    if type(stream) is not bool:
        raise ProtocolError("stream must be true or false")
    bias = doc.get("logit_bias") or {}
    if type(bias) is not dict or any(type(v) not in (int, float) or type(v) is bool for v in bias.values()):
        raise ProtocolError("logit_bias must map token ids to numbers")
    if kind == "openai.chat":
        lp = doc.get("logprobs", False)
        if lp is not None and type(lp) is not bool:
            raise ProtocolError("logprobs must be true or false for chat completions")
        logprobs = int(bool(lp))
    else:
        logprobs = _int(doc, "logprobs", 0, 20)
    return {
        "request.stream": stream,
        "request.logprobs": logprobs,
        "request.top_logprobs": _int(doc, "top_logprobs", 0, 20),
        "request.logit_bias": len(bias),
        "request.logit_bias_max": max((abs(float(v)) for v in bias.values()), default=0.0),
        "request.max_tokens": _int(doc, "max_tokens", 0, 1 << 24) or _int(doc, "max_completion_tokens", 0, 1 << 24),
    }


def parse_openai(kind: str, body: bytes, *, content_type: str | None, limits: ParseLimits) -> ParsedRequest:
    """Prompt texts (one per row) and request properties of an OpenAI-compatible request."""
    require_json(content_type)
    doc = loads_object(body, limits.max_depth)
    if kind == "openai.chat":
        messages = doc.get("messages")
        if type(messages) is not list or not messages:
            raise ProtocolError("messages must be a non-empty list")
        texts = ["\n".join(_message_text(m, i) for i, m in enumerate(messages))]
    elif kind == "openai.completions":
        texts = _texts(doc.get("prompt"), "prompt")
    elif kind == "openai.embeddings":
        texts = _texts(doc.get("input"), "input")
    else:
        raise ProtocolError("unknown protocol")
    if any(len(t) > limits.max_text_chars for t in texts):
        raise ProtocolError(f"a prompt is longer than {limits.max_text_chars} characters")
    if len(texts) > limits.max_texts:
        raise ProtocolError(f"too many text inputs: more than {limits.max_texts}")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("text is not valid Unicode (a lone surrogate escape)") from None
    model = doc.get("model")
    names = (model,) if type(model) is str else ()
    properties = _properties(kind, doc)
    if properties["request.logit_bias"]:
        # the bias is part of what the model is asked: a sweep over tokens under one prompt becomes a series of
        # near-duplicates for the session trackers, while an exact retry stays an exact duplicate
        marks = " ".join(f"logit_bias_{key}" for key in sorted(doc["logit_bias"]))
        texts = [f"{t}\n{marks}" for t in texts]
    parsed = text_request(texts, protocol=kind, names=names, limits=limits)
    return ParsedRequest(features=parsed.features, rows=parsed.rows, row_shape=parsed.row_shape, protocol=kind,
                         input_names=names, requested_outputs=(), texts=parsed.texts,
                         properties=properties, hashed_texts=parsed.hashed_texts)
