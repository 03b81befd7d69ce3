"""Builds the session store (and the shared global fingerprint index) a guard process runs with.

``GUARD_REDIS_URL`` unset: the in-memory store. Set: Redis with the memory store as fallback. Two optional
query parameters of the URL are read here and removed before the URL reaches redis-py:
``key_prefix`` (default ``inference-guard:``; give each deployment sharing one Redis its own) and
``budget_ms`` (default 50: a Redis call slower than this is answered from local state). Example:
``redis://redis:6379/0?key_prefix=fraud-model:&budget_ms=30``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from guard_agent.contracts import TrackerStateCodec
from guard_agent.events import EventLogger
from guard_agent.metrics import Metrics
from guard_agent.sessions.base import SessionStore
from guard_agent.sessions.memory import MemorySessionStore
from guard_agent.sessions.redis.link import RedisLink, RedisMetrics
from guard_agent.sessions.redis.store import RedisSessionStore
from guard_agent.settings import ConfigError, Settings

if TYPE_CHECKING:
    from guard_agent.sessions.redis.global_index import RedisGlobalIndex
    from guard_agent.tracking import SessionTracking

__all__ = ["DEFAULT_PREFIX", "make_global_observer", "make_session_store", "redis_link", "split_redis_url"]

DEFAULT_PREFIX = "inference-guard:"
_LINKS: weakref.WeakKeyDictionary[Metrics, RedisLink] = weakref.WeakKeyDictionary()


def split_redis_url(url: str) -> tuple[str, str, float]:
    """``(url for redis-py, key prefix, budget seconds)`` from ``GUARD_REDIS_URL``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in ("key_prefix", "budget_ms")}
    rest = [(k, v) for k, v in query if k not in ours]
    prefix = ours.get("key_prefix") or DEFAULT_PREFIX
    try:
        budget = float(ours.get("budget_ms", "50")) / 1000.0
    except ValueError as exc:
        raise ConfigError(f"setting redis_url: budget_ms must be a number: {exc}") from None
    if not 0.001 <= budget <= 5.0:
        raise ConfigError("setting redis_url: budget_ms must be within [1, 5000]")
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix, budget


def redis_link(settings: Settings, *, metrics: Metrics, events: EventLogger) -> RedisLink:
    """The process's one Redis link (one pool), shared by the session store and the global index."""
    link = _LINKS.get(metrics)
    if link is None:
        if not settings.redis_url:
            raise ConfigError("redis_url is not set")
        if not settings.hmac_key:
            raise ConfigError("GUARD_HMAC_KEY is required with GUARD_REDIS_URL: replicas must derive the same "
                              "session ids and fingerprint salt")
        url, prefix, budget = split_redis_url(settings.redis_url)
        link = RedisLink(url, prefix=prefix, budget=budget, metrics=RedisMetrics.for_registry(metrics.registry),
                         log=events.log)
        _LINKS[metrics] = link
    return link


def make_session_store(settings: Settings, *, metrics: Metrics, events: EventLogger,
                       tracking: TrackerStateCodec) -> SessionStore:
    """Memory when ``settings.redis_url`` is unset; otherwise Redis with the memory store as local fallback.

    ``tracking`` provides ``encode_state``/``decode_state`` (``SessionTracking`` or the no-op ``NoTrackers``).
    The Redis store has an ``aclose()`` to call at shutdown.
    """
    local = MemorySessionStore(max_sessions=settings.session_max, ttl=settings.session_ttl,
                               on_evict=lambda reason: metrics.session_evictions.labels(reason).inc())
    if not settings.redis_url:
        return local
    return RedisSessionStore(redis_link(settings, metrics=metrics, events=events), local=local, codec=tracking,
                             ttl=settings.session_ttl)


def make_global_observer(settings: Settings, *, metrics: Metrics, events: EventLogger,
                         tracking: SessionTracking) -> RedisGlobalIndex | None:
    """With Redis: a ``RedisGlobalIndex`` (falling back to the trackers' own index) that the trackers then
    answer ``session.global_fingerprint`` from. Returns it, or None without Redis (nothing to share)."""
    if not settings.redis_url:
        return None
    from guard_agent.sessions.redis.global_index import RedisGlobalIndex

    observer = RedisGlobalIndex(redis_link(settings, metrics=metrics, events=events), local=tracking.global_index,
                                max_entries=settings.global_max_entries)
    tracking.share_global(observer)
    return observer
