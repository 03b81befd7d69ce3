"""Custom routes: the input is found in the JSON body by an RFC 6901 JSON pointer from config.

Wire format: any JSON object; the pointer (``/a/0/b``, with ``~1`` for ``/`` and ``~0`` for ``~``)
names a numeric array that is either one row (``[1, 2, 3]``) or a batch (``[[1, 2, 3], [4, 5, 6]]``,
or deeper: the first dimension is the batch, the rest is one instance)::

    POST /score   {"request": {"features": [[1.0, 2.0], [3.0, 4.0]]}}   with pointer /request/features
"""

from __future__ import annotations

import re
from typing import Any

from guard_agent.protocols._base import (
    ParsedRequest,
    ParseLimits,
    ProtocolError,
    build_request,
    numeric_array,
)
from guard_agent.protocols._json import loads_object, require_json

__all__ = ["parse_custom", "resolve_pointer", "split_pointer"]

_BAD_ESCAPE = re.compile(r"~(?![01])")
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")


def split_pointer(pointer: str) -> tuple[str, ...]:
    """Decode a pointer into reference tokens; ProtocolError("bad pointer ...") when malformed."""
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ProtocolError("bad pointer: must be empty or start with '/'")
    tokens = pointer[1:].split("/")
    if any(_BAD_ESCAPE.search(t) for t in tokens):
        raise ProtocolError("bad pointer: '~' must be followed by 0 or 1")
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in tokens)


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """Follow ``pointer`` through ``doc``; the error names the pointer (config), never body values."""
    node = doc
    for depth, token in enumerate(split_pointer(pointer), start=1):
        if type(node) is dict:
            if token not in node:
                raise ProtocolError(f"pointer {pointer}: member #{depth} not found in the body")
            node = node[token]
        elif type(node) is list:
            if _INDEX.fullmatch(token) is None:
                raise ProtocolError(f"bad pointer {pointer}: token #{depth} is not an array index")
            index = int(token)
            if index >= len(node):
                raise ProtocolError(f"pointer {pointer}: index #{depth} out of range in the body")
            node = node[index]
        else:
            raise ProtocolError(f"pointer {pointer}: token #{depth} goes through a scalar in the body")
    return node


def parse_custom(
    body: bytes, *, pointer: str | None, content_type: str | None, limits: ParseLimits
) -> ParsedRequest:
    """Parse a custom-route request: JSON object, pointer to a numeric array (one row or a batch)."""
    if pointer is None:
        raise ProtocolError("bad pointer: custom route has no pointer")
    split_pointer(pointer)  # a bad pointer is reported as such even for a bad body
    require_json(content_type)
    doc = loads_object(body, limits.max_depth)
    arr = numeric_array(resolve_pointer(doc, pointer), where=f"pointer {pointer}")
    if arr.ndim == 0:
        raise ProtocolError(f"pointer {pointer}: expected a numeric array, found a single number")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    return build_request([arr], protocol="custom", row_shape=None, names=(), outputs=(), limits=limits)
