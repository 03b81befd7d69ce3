"""A synchronous Open Inference Protocol v2 client that attacks send their queries through.

One persistent HTTP/1.1 connection per client (attacks are sequential, like ART's predict loop), one
request per row by default, each under an API key from a pool. A refused answer (403, or 429 after
``max_retries`` retries) gives the attack nothing: its rows come back with label ``REFUSED`` (-1) and
no probabilities, and the attacker moves on. A key refused ``refusals_to_retire`` times in a row is
taken to be blocked and retired; when no key is left the attack stops with :class:`AttackBlocked`.
Every request carries ``X-Request-Id: {run_id}-{n}`` so a benchmark can join the guard's decision
events to the attack's queries.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

__all__ = ["REFUSED", "Answer", "AttackBlocked", "GuardClient"]

#: Label of a row whose request was refused.
REFUSED = -1


class AttackBlocked(RuntimeError):
    """Every key of the attack was refused: the attack cannot continue."""


@dataclass(frozen=True)
class Answer:
    """The model's answer for the rows of one request, as the attacker sees it."""

    labels: np.ndarray
    probabilities: np.ndarray | None


@dataclass
class GuardClient:
    """Queries ``url`` (the guard, or the model directly for a baseline) for ``model``."""

    url: str
    keys: list[str]
    run_id: str
    model: str = "digits"
    batch_size: int = 1
    max_retries: int = 3
    refusals_to_retire: int = 3
    timeout: float = 30.0
    source_address: str | None = None  # the local address to connect from (None: the system's choice)
    sent: int = 0
    answered: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)
    answered_rows: list[Any] = field(default_factory=list)  # feature rows (np.ndarray), or texts
    answered_labels: list[int] = field(default_factory=list)
    _next: int = 0
    _streak: dict[str, int] = field(default_factory=dict)
    _conn: http.client.HTTPConnection | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("at least one key is needed")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("url must be http://host:port")
        self._host, self._port = parts.hostname, parts.port or 80
        self._path = f"/v2/models/{self.model}/infer"

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def predict(self, X: np.ndarray) -> Answer:
        """Answer every row (in ``batch_size`` requests); raises AttackBlocked when no key is left."""
        X = np.asarray(X, dtype=np.float64).reshape(np.asarray(X).shape[0], -1)
        labels: list[np.ndarray] = []
        probas: list[np.ndarray] = []
        for start in range(0, X.shape[0], self.batch_size):
            ans = self._request(X[start : start + self.batch_size])
            labels.append(ans.labels)
            if ans.probabilities is not None:
                probas.append(ans.probabilities)
        proba = np.concatenate(probas) if len(probas) == len(labels) else None
        return Answer(np.concatenate(labels), proba)

    def _request(self, rows: np.ndarray) -> Answer:
        tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}
        body = orjson.dumps({"inputs": [tensor], "outputs": [{"name": "predict_proba"}]})
        return self._exchange(body, rows)

    def _exchange(self, body: bytes, rows: Sequence[Any] | np.ndarray) -> Answer:
        """Send one request for ``rows`` (feature rows, or texts for the text client) under the key rotation."""
        n = len(rows)
        throttled = 0
        while True:
            live = [k for k in self.keys if k not in self.retired]
            if not live:
                raise AttackBlocked(f"{self.run_id}: all {len(self.keys)} keys refused")
            key = live[self._next % len(live)]
            self._next += 1
            status, payload = self._post(body, key, f"{self.run_id}-{self.sent}")
            self.sent += n
            if status == 200:
                self._streak[key] = 0
                ans = _parse(payload, n)
                self.answered += n
                self.answered_rows.extend(rows)
                self.answered_labels.extend(int(v) for v in ans.labels)
                return ans
            self.refused[status] = self.refused.get(status, 0) + 1
            if status == 429 and throttled < self.max_retries:
                throttled += 1
                time.sleep(0.05 * throttled)
                continue
            self._streak[key] = self._streak.get(key, 0) + 1
            if self._streak[key] >= self.refusals_to_retire:
                self.retired.append(key)
                if len(self.retired) >= len(self.keys):
                    raise AttackBlocked(f"{self.run_id}: all {len(self.keys)} keys refused")
            return Answer(np.full(n, REFUSED, dtype=np.int64), None)

    def _post(self, body: bytes, key: str, request_id: str) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "X-API-Key": key, "X-Request-Id": request_id}
        for attempt in range(2):
            if self._conn is None:
                source = None if self.source_address is None else (self.source_address, 0)
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout,
                                                        source_address=source)
            try:
                self._conn.request("POST", self._path, body=body, headers=headers)
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _parse(payload: bytes, rows: int) -> Answer:
    """Labels and probabilities from a v2 response (hardened answers may be top-1 or rounded)."""
    doc = orjson.loads(payload)
    outputs = doc.get("outputs") or []
    for out in outputs:
        data = np.asarray(out.get("data", []), dtype=np.float64)
        if out.get("name") == "predict_proba" and data.size and data.size % rows == 0:
            proba = data.reshape(rows, -1)
            return Answer(np.argmax(proba, axis=1), proba)
    for out in outputs:
        data = np.asarray(out.get("data", []))
        if data.size == rows:
            return Answer(data.astype(np.int64).reshape(rows), None)
    raise ValueError("response carries no usable output")
