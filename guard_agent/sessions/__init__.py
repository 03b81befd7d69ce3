"""Session state: one record per client, in memory (default) or shared through Redis."""

from guard_agent.sessions.base import SessionRecord, SessionStore
from guard_agent.sessions.memory import MemorySessionStore

__all__ = ["MemorySessionStore", "SessionRecord", "SessionStore"]
