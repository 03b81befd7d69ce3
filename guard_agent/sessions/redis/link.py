"""The process's one Redis client, its health and the time budget of every call.

A call that fails or takes longer than the budget is answered by the caller's local state, never by an error
(``FALLBACK``): a guard keeps deciding while Redis is down. After a connection error, or several slow calls in
a row, Redis counts as down; a background probe reconnects with exponential back-off and then runs the
``on_recover`` callbacks (the session store merges what changed meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["FALLBACK", "Logger", "RedisLink", "RedisMetrics"]

T = TypeVar("T")
FALLBACK: Final = object()  # what ``RedisLink.run`` returns instead of a value when Redis did not answer


class RedisMetrics:
    """``inference_guard_redis_*`` metrics, registered once per registry (store and global index share them)."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, RedisMetrics]] = (
        weakref.WeakKeyDictionary())

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge("inference_guard_redis_up", "1 while Redis answers, 0 while the local fallback is used",
                        registry=r)
        self.fallbacks = Counter("inference_guard_redis_fallbacks_total",
                                 "Calls answered from local state because Redis failed, was slow or is down",
                                 ["op", "reason"], registry=r)
        self.reconnects = Counter("inference_guard_redis_reconnects_total",
                                  "Times Redis became reachable again after a failure", registry=r)
        self.reconciled = Counter("inference_guard_redis_reconciled_total",
                                  "Sessions changed during an outage and merged back into Redis", ["result"],
                                  registry=r)
        self.dirty = Gauge("inference_guard_redis_dirty_sessions",
                           "Sessions changed while Redis was unreachable, not yet merged back", registry=r)
        self.state_errors = Counter("inference_guard_redis_state_errors_total",
                                    "Session fields that could not be stored or read (kept local / reset)",
                                    ["kind"], registry=r)
        self.latency = Histogram("inference_guard_redis_call_seconds", "Redis call latency", ["op"],
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1), registry=r)
        self.up.set(1)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> RedisMetrics:
        """The one instance for this registry (a second registration would raise)."""
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


Logger = Callable[..., None]  # EventLogger.log(level, message, **fields)
# Replies that mean "this server cannot serve us now" (failover, restart, a stuck script): reconnect.
_OUTAGE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "BUSY", "NOSCRIPT", "CLUSTERDOWN")


class RedisLink:
    """One client (one connection pool) per guard process, its health, and the time budget of every call.

    ``run`` never raises for Redis trouble: it returns ``FALLBACK`` and the caller uses local state. After a
    connection error, or ``down_after_timeouts`` calls in a row slower than the budget, Redis counts as down:
    calls fall back at once (no waiting) until a background probe gets a PING through; then the
    ``on_recover`` callbacks run (e.g. reconciling sessions changed during the outage).
    """

    def __init__(self, url: str, *, prefix: str, metrics: RedisMetrics, log: Logger, budget: float = 0.05,
                 socket_timeout: float = 0.25, max_connections: int = 64,
                 backoff: tuple[float, float] = (0.2, 5.0), down_after_timeouts: int = 3) -> None:
        self.url = url
        self.prefix = prefix
        self.metrics = metrics
        self.budget = budget
        self.up = True
        self.log = log
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._backoff = backoff
        self._down_after = down_after_timeouts
        self._timeouts = 0  # consecutive: one slow call under load is not an outage
        self._last_error_log = -math.inf
        self._client: Any = None
        self._probe: asyncio.Task[None] | None = None
        self._recover: list[Callable[[], Awaitable[None]]] = []
        self._closed = False
        import redis.asyncio  # noqa: F401 - imported now, not inside the first request's time budget

    @property
    def client(self) -> Any:
        """The redis.asyncio client, created on first use (inside the running loop)."""
        if self._client is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = Redis.from_url(
                self.url, socket_timeout=self._socket_timeout, socket_connect_timeout=self._socket_timeout,
                retry=Retry(NoBackoff(), 1), max_connections=self._max_connections, decode_responses=False,
                client_name="inference-guard")
        return self._client

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time Redis answers again after a failure."""
        self._recover.append(callback)

    async def run(self, op: str, call: Callable[[Any], Awaitable[T]], *,
                  budget: float | None = None) -> T | object:
        """``await call(client)`` within the budget, else ``FALLBACK`` (counted; Redis marked down)."""
        if not self.up or self._closed:
            self.metrics.fallbacks.labels(op, "down").inc()
            return FALLBACK
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(call(self.client), budget or self.budget)
        except TimeoutError as exc:
            self._timeouts += 1
            if self._timeouts < self._down_after:
                self.metrics.fallbacks.labels(op, "timeout").inc()
                return FALLBACK
            self._failed(op, "timeout", exc)
            return FALLBACK
        except Exception as exc:  # any client/server error means: use local state
            from redis.exceptions import ResponseError

            if isinstance(exc, ResponseError) and not str(exc).startswith(_OUTAGE_REPLIES):
                self.metrics.fallbacks.labels(op, "error").inc()  # e.g. OOM: the server answers, keep using it
                now = time.monotonic()
                if now - self._last_error_log > 60.0:
                    self._last_error_log = now
                    self.log("warning", "redis command failed: using local session state for it",
                             guard={"redis": {"op": op, "error": str(exc)[:200]}})
                return FALLBACK
            self._failed(op, "error", exc)
            return FALLBACK
        self._timeouts = 0
        self.metrics.latency.labels(op).observe(time.perf_counter() - t0)
        return result

    def _failed(self, op: str, reason: str, exc: BaseException) -> None:
        self.metrics.fallbacks.labels(op, reason).inc()
        self._timeouts = 0
        if self.up:
            self.up = False
            self.metrics.up.set(0)
            self.log("warning", "redis unreachable or slow: using local session state",
                      guard={"redis": {"op": op, "reason": reason, "error": type(exc).__name__}})
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        delay = self._backoff[0]
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                # Drop every pooled connection: after a restart they are all dead.
                await asyncio.wait_for(self.client.connection_pool.disconnect(), 1.0)
                await asyncio.wait_for(self.client.ping(), max(self.budget, 0.05))
            except Exception:  # still down: back off and try again
                delay = min(delay * 2.0, self._backoff[1])
                continue
            self.up = True
            self.metrics.up.set(1)
            self.metrics.reconnects.inc()
            self.log("info", "redis reachable again: shared session state resumed", guard={"redis": {}})
            for callback in self._recover:
                try:
                    await callback()
                except Exception as exc:  # a failed reconcile must not stop the link from working
                    self.log("error", "redis recovery step failed", guard={"redis": {"error": repr(exc)[:200]}})
            if self.up:
                return
            delay = self._backoff[0]

    async def aclose(self) -> None:
        """Stop probing and close the pool (idempotent)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
