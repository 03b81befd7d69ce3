"""Strict JSON for request bodies: one reading only, so the guard and the model server agree.

Refused: bodies that are not UTF-8, invalid JSON, duplicate keys at any depth (two parsers may keep
different copies), nesting deeper than the limit, a non-object top level, and any ``Content-Encoding``
other than absent/``identity``. ``NaN``/``Infinity``/``-Infinity`` literals are parsed as floats and
left to the caller's policy.

Fast path (bodies without any backslash, i.e. nearly all numeric payloads): orjson parses, then one
walk over the parsed tree checks depth and counts keys. Without escapes, every ``:`` in the body is
either a key separator or a character inside a string, and a duplicate key always loses at least one
key (and anything in the overwritten value), so the body has no duplicate keys exactly when
``body.count(":") == keys + colons inside parsed strings``. Bodies with escapes, NaN/Infinity literals,
or anything orjson refuses take the exact slow path: the stdlib decoder with an ``object_pairs_hook``.
Measured by bench/parse_cost.py.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from guard_agent.protocols._base import ProtocolError

__all__ = ["check_content_encoding", "loads_object", "loads_response", "media_type", "require_json"]


class _DuplicateKeyError(Exception):
    """Raised from inside the decoder; deliberately not a ValueError so nothing else swallows it."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKeyError
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)
_PLAIN_DECODER = json.JSONDecoder()


def check_content_encoding(content_encoding: str | None) -> None:
    """Only identity bodies can be scored byte for byte; compressed ones are refused, not decoded."""
    if content_encoding is None:
        return
    value = content_encoding.strip().lower()
    if value not in ("", "identity"):
        raise ProtocolError("unsupported Content-Encoding: only identity bodies are accepted")


def media_type(content_type: str | None) -> tuple[str | None, dict[str, str]]:
    """Split a Content-Type into its lower-case media type and parameters (None when absent)."""
    if content_type is None or not content_type.strip():
        return None, {}
    head, *rest = content_type.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, _, val = item.partition("=")
        params[key.strip().lower()] = val.strip().strip('"').lower()
    return head.strip().lower(), params


def require_json(content_type: str | None) -> None:
    """Accept an absent Content-Type or ``application/json`` in UTF-8; refuse everything else."""
    if content_type is None or content_type == "application/json":  # the usual request: nothing to split
        return
    kind, params = media_type(content_type)
    if kind not in (None, "application/json"):
        raise ProtocolError("unsupported Content-Type: expected application/json")
    if params.get("charset", "utf-8") not in ("utf-8", "utf8"):
        raise ProtocolError("unsupported charset: JSON bodies must be UTF-8")


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        if type(node) is list and not {list, dict}.intersection(map(type, node)):
            continue
        stack.extend((c, depth + 1) for c in children if type(c) in (list, dict))
    return False


_NESTED_OR_STR = frozenset({dict, list, str})


_NUMBERS = frozenset({float, int})


def _numbers_only(values: list[Any]) -> bool:
    """Whether a list that starts with a number holds numbers (or booleans) only: ``sum()`` stops at the first
    string, list, dict or null, at about a third of the cost of a ``type()`` per element. False (a list of
    objects, or a number followed by something else) leaves the answer to the exact test."""
    if not values or type(values[0]) not in _NUMBERS:
        return False
    try:
        sum(values)
    except (TypeError, OverflowError):  # OverflowError: a float plus an integer beyond float's range
        return False
    return True


def _audit(value: Any, limit: int) -> tuple[int, int] | None:
    """(number of keys, number of ':' inside strings) of a parsed tree; None when deeper than limit."""
    keys = colons = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return None
        if type(node) is dict:
            keys += len(node)
            colons += "".join(node).count(":")  # the keys' colons, in one scan of one string
            children: Any = node.values()
        elif _numbers_only(node) or _NESTED_OR_STR.isdisjoint(map(type, node)):
            continue  # a leaf list of numbers: the common case, checked at C speed
        else:
            children = node
        for child in children:
            kind = type(child)
            if kind is str:
                colons += child.count(":")
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return keys, colons


def _loads_fast(body: bytes, max_depth: int) -> dict[str, Any] | None:
    """orjson plus the colon-count duplicate check; None when the exact slow path must decide."""
    if b"\\" in body:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict:
        raise ProtocolError("JSON body must be an object at the top level")
    audit = _audit(value, max_depth)
    if audit is None:
        raise ProtocolError(f"JSON nested deeper than {max_depth} levels")
    keys, colons = audit
    if body.count(b":") != keys + colons:
        raise ProtocolError("invalid JSON: duplicate key in an object")
    return value


def loads_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """Decode a request body to a JSON object or raise ProtocolError saying what is wrong."""
    fast = _loads_fast(body, max_depth)
    if fast is not None:
        return fast
    return _loads_exact(body, max_depth)


def _loads_exact(body: bytes, max_depth: int) -> dict[str, Any]:
    """The stdlib decoder with a duplicate-refusing hook: exact for every input, ~4x slower."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("body is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except _DuplicateKeyError:
        raise ProtocolError("invalid JSON: duplicate key in an object") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ProtocolError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError:  # int literals beyond sys.get_int_max_str_digits()
        raise ProtocolError("invalid JSON: number literal too long") from None
    if type(value) is not dict:
        raise ProtocolError("JSON body must be an object at the top level")
    # Cheap bound first: nesting can never exceed the number of opening brackets.
    if body.count(b"[") + body.count(b"{") > max_depth and _depth_exceeds(value, max_depth):
        raise ProtocolError(f"JSON nested deeper than {max_depth} levels")
    return value


def loads_response(body: bytes) -> Any:
    """Decode an upstream response leniently (the upstream is trusted); None when it is not JSON.

    orjson first for speed; the stdlib decoder as a fallback accepts NaN/Infinity literals.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return _PLAIN_DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
