"""A small, bounded, synchronous inference client for the self-test (the attack libraries call it synchronously).

Every request counts against one shared budget and one deadline, so the whole
self-test stays bounded whatever an attack library asks for.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import orjson

from guard_agent.attacks import Answer as AttackAnswer
from guard_agent.attacks import GuardClient

__all__ = ["Answer", "Budget", "BudgetExhausted", "InferenceClient", "PacedGuardClient"]


class BudgetExhausted(Exception):
    """The self-test's request budget or time limit ran out."""


@dataclass
class Budget:
    max_requests: int
    deadline: float                       # time.monotonic() value
    used: int = 0

    def spend(self) -> None:
        if self.used >= self.max_requests:
            raise BudgetExhausted(f"request budget of {self.max_requests} used up")
        if time.monotonic() >= self.deadline:
            raise BudgetExhausted("time limit reached")
        self.used += 1


@dataclass(frozen=True)
class Answer:
    status: int
    request_id: str
    scores: np.ndarray | None = field(default=None, repr=False)  # (rows, classes) probabilities, or one-hot labels

    @property
    def refused(self) -> bool:
        return self.status in (403, 429)


class InferenceClient:
    """Sends one row (or a batch) per request to an Open Inference Protocol v2 route, under one API key
    (status-level checks: benign and OOD traffic; the attacks use ``PacedGuardClient``)."""

    def __init__(self, target: str, model: str, *, budget: Budget, key: str | None = None, rate: float = 20.0,
                 timeout: float = 10.0, label: str = "selftest") -> None:
        if not target.startswith(("http://", "https://")):
            raise ValueError(f"the target must be an http(s) URL, not {target[:40]!r}")
        self.base = target.rstrip("/")
        self.model = model
        self.budget = budget
        self.key = key or f"{label}-{secrets.token_hex(8)}"
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.timeout = timeout
        self.label = label
        self.sent = 0
        self.request_ids: list[str] = []
        self._last = 0.0

    @property
    def url(self) -> str:
        return f"{self.base}/v2/models/{self.model}/infer"

    def _body(self, X: np.ndarray) -> bytes:
        return orjson.dumps({"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64",
                                         "data": X.ravel().tolist()}],
                             "outputs": [{"name": "predict_proba"}]})

    def _parse(self, payload: bytes, rows: int) -> np.ndarray | None:
        try:
            doc = orjson.loads(payload)
            data = np.asarray(doc["outputs"][0]["data"], dtype=np.float64)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            return None
        return data.reshape(rows, -1)

    def send(self, X: np.ndarray) -> Answer:
        """One request with the rows of ``X``; paced to ``rate`` requests per second."""
        self.budget.spend()
        wait = self._last + self.interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last = time.monotonic()
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        self.sent += 1
        rid = f"{self.label}-{self.sent}-{secrets.token_hex(3)}"
        self.request_ids.append(rid)
        request = urllib.request.Request(self.url, data=self._body(X), method="POST", headers={  # noqa: S310
            "Content-Type": "application/json", "X-API-Key": self.key, "X-Request-Id": rid})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310 - http(s) checked above
                return Answer(resp.status, rid, self._parse(resp.read(), X.shape[0]))
        except urllib.error.HTTPError as exc:
            exc.read()
            return Answer(exc.code, rid)



@dataclass
class PacedGuardClient(GuardClient):
    """The attack benchmark's client (``guard_agent.attacks.GuardClient``) with pacing and the shared budget:
    one request per row, at most one per ``interval`` seconds, each charged to ``budget``."""

    interval: float = 0.05
    budget: Budget | None = None
    _last_sent: float = 0.0

    def predict(self, X: np.ndarray) -> AttackAnswer:
        rows = np.asarray(X, dtype=np.float64).reshape(np.asarray(X).shape[0], -1)
        labels: list[np.ndarray] = []
        probas: list[np.ndarray] = []
        for row in rows:
            if self.budget is not None:
                self.budget.spend()
            wait = self._last_sent + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_sent = time.monotonic()
            answer = super().predict(row[None, :])
            labels.append(answer.labels)
            if answer.probabilities is not None:
                probas.append(answer.probabilities)
        proba = np.concatenate(probas) if probas and len(probas) == len(labels) else None
        return AttackAnswer(np.concatenate(labels) if labels else np.empty(0, dtype=np.int64), proba)
