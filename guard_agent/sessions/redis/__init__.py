"""Session state and the global fingerprint index shared by every replica through Redis."""

from guard_agent.sessions.redis.global_index import RedisGlobalIndex
from guard_agent.sessions.redis.store import RedisLink, RedisMetrics, RedisSessionStore, SyncedRecord

__all__ = ["RedisGlobalIndex", "RedisLink", "RedisMetrics", "RedisSessionStore", "SyncedRecord"]
