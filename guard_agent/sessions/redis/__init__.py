"""Session state and the global fingerprint index shared by every replica through Redis.

``link``: the one client, its health and time budget; ``lua`` and ``records``: the session hash's scripts and
the records that remember their last sync; ``store``: the ``SessionStore``; ``global_index``: the near-duplicate
index over every session and replica.
"""

from guard_agent.sessions.redis.global_index import RedisGlobalIndex
from guard_agent.sessions.redis.link import FALLBACK, RedisLink, RedisMetrics
from guard_agent.sessions.redis.records import SyncedRecord
from guard_agent.sessions.redis.store import RedisSessionStore

__all__ = ["FALLBACK", "RedisGlobalIndex", "RedisLink", "RedisMetrics", "RedisSessionStore", "SyncedRecord"]
