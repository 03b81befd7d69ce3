"""Talking to the model server directly (never through the guard's handler), for canaries and metadata.

Canary traffic goes from the guard's shared client straight to the upstream URL, so it never enters the
route table, sessions, trackers, decision events or request metrics, and no client ever sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import orjson

from guard_agent.protocols.responses import parse_response

__all__ = ["Answer", "UpstreamError", "fetch_metadata", "infer", "infer_body", "infer_path"]

_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity",
            "User-Agent": "inference-guard-canary"}
_INT_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT8")


class UpstreamError(Exception):
    """The model server could not be asked (unreachable, timed out, or answered with an error status)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status when the server answered with an error; None when no answer came back."""

    @property
    def refused(self) -> bool:
        """The server answered and refused the request itself (a 4xx other than 408 timeout / 429 overload): the
        model no longer accepts what its approved version answered, unlike an outage or a busy server."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (408, 429)


@dataclass(frozen=True)
class Answer:
    """What the model answered to a batch, as far as the guard can read it."""

    labels: np.ndarray | None
    probabilities: np.ndarray | None
    readable: bool


def infer_path(protocol: str, model: str) -> str:
    name = quote(model, safe="")
    return f"/v2/models/{name}/infer" if protocol == "v2" else f"/v1/models/{name}:predict"


def metadata_path(protocol: str, model: str) -> str:
    name = quote(model, safe="")
    return f"/v2/models/{name}" if protocol == "v2" else f"/v1/models/{name}"


def infer_body(protocol: str, X: np.ndarray, *, input_name: str = "input-0", datatype: str = "FP64",
               outputs: Sequence[str] = ()) -> bytes:
    """The request body that asks the model about ``X``."""
    values = np.rint(X).astype(np.int64) if datatype in _INT_TYPES else X
    if protocol == "v1":
        return orjson.dumps({"instances": values.tolist()})
    doc: dict[str, Any] = {"inputs": [{"name": input_name, "shape": list(X.shape), "datatype": datatype,
                                       "data": values.ravel().tolist()}]}
    if outputs:
        doc["outputs"] = [{"name": o} for o in outputs]
    return orjson.dumps(doc)


async def infer(client: aiohttp.ClientSession, upstream: str, model: str, X: np.ndarray, *, protocol: str = "v2",
                input_name: str = "input-0", datatype: str = "FP64", outputs: Sequence[str] = (),
                timeout: float = 30.0) -> Answer:
    """Send one batch; raises UpstreamError when no answer came back (not a verdict on the model)."""
    url = upstream.rstrip("/") + infer_path(protocol, model)
    body = infer_body(protocol, X, input_name=input_name, datatype=datatype, outputs=outputs)
    try:
        async with client.post(url, data=body, headers=_HEADERS, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            payload = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamError(f"{type(exc).__name__}: {exc}".strip(": ")) from exc
    if not 200 <= status < 300:
        raise UpstreamError(f"HTTP {status} from {infer_path(protocol, model)}", status=status)
    parsed = parse_response(protocol, payload, X.shape[0])
    if parsed is None:
        return Answer(None, None, readable=False)
    return Answer(parsed.labels, parsed.probabilities, readable=True)


async def fetch_metadata(client: aiohttp.ClientSession, upstream: str, model: str, *, protocol: str = "v2",
                         timeout: float = 10.0) -> Mapping[str, Any] | None:
    """The model's metadata document; None when the server answered but not with a JSON object."""
    url = upstream.rstrip("/") + metadata_path(protocol, model)
    try:
        async with client.get(url, headers=_HEADERS, allow_redirects=False,
                              timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            payload = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamError(f"{type(exc).__name__}: {exc}".strip(": ")) from exc
    if status >= 500:
        raise UpstreamError(f"HTTP {status} from {metadata_path(protocol, model)}", status=status)
    if status != 200:
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
