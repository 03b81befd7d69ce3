"""Operational events about the sinks themselves: on stdout, and to the other SIEM sinks.

A sink that is down or full must not be the only place that says so. Status lines go to the
primary sink (stdout) and are offered to the other sinks, so a SIEM fed by two sinks learns
that one of them has a gap. A recovering sink also gets its own ``sink_up`` line (with the
events lost while it was down), so the SIEM behind it sees its gap too. Drop announcements
never go to the sink that dropped (that could feed itself). The lines have the shape of
``EventLogger.log`` output (``message``, ``log.level``, ``event``, ``guard``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from guard_agent.events import EventSink

__all__ = ["Alarm", "Scope"]

Scope = Literal["stdout", "others", "all"]
_LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3, "critical": 4}


class Alarm:
    """Renders and writes sink status events; drop announcements are aggregated per interval."""

    def __init__(self, primary: EventSink, *, drop_interval: float = 10.0, min_level: str = "info") -> None:
        self._primary = primary
        self._min_level = _LEVELS.get(min_level, 1)
        self._interval = drop_interval
        self._lock = threading.Lock()
        self._drops: dict[tuple[str, str], int] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._sinks: dict[str, Callable[[bytes], object]] = {}

    def attach(self, name: str, offer: Callable[[bytes], object]) -> None:
        """Let status lines reach the SIEM sink ``name`` too (its non-blocking ``offer``)."""
        self._sinks[name] = offer

    def detach_all(self) -> None:
        """Status lines to stdout only (the sinks are shutting down)."""
        self._sinks = {}

    def emit(self, level: str, message: str, action: str, *, scope: Scope = "others", **guard: Any) -> None:
        """One status line (never raw events, never tokens): stdout, plus the other sinks or all of them.

        Lines below the configured ``log_level`` are not written (losses are errors: always written).
        """
        if _LEVELS.get(level, 1) < self._min_level:
            return
        outcome = "failure" if level in ("warning", "error", "critical") else "success"
        doc = {
            "@timestamp": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "log": {"level": level},
            "message": message,
            "event": {"kind": "event", "category": ["process"], "action": action, "outcome": outcome},
            "guard": guard,
        }
        line = orjson.dumps(doc)
        self._primary.write(line)
        if scope == "stdout":
            return
        for name, offer in self._sinks.items():
            if scope == "all" or name != guard.get("sink"):
                offer(line)

    def dropped(self, sink: str, reason: str, count: int, **guard: Any) -> None:
        """Announce lost events: the first loss at once, then one summary per interval while it lasts."""
        key = (sink, reason)
        now = time.monotonic()
        with self._lock:
            self._drops[key] = self._drops.get(key, 0) + count
            if now - self._last.get(key, -1e9) < self._interval:
                return
            self._last[key] = now
            total, self._drops[key] = self._drops[key], 0
        self.emit("error", f"sink {sink}: {total} events dropped ({reason})", "sink_events_dropped",
                  sink=sink, reason=reason, dropped=total, **guard)

    def tick(self) -> None:
        """Announce drops that waited a full interval (called periodically: a burst that stopped is still told)."""
        now = time.monotonic()
        with self._lock:
            due = {k: v for k, v in self._drops.items() if v and now - self._last.get(k, -1e9) >= self._interval}
            for key in due:
                self._drops[key] = 0
                self._last[key] = now
        for (sink, reason), total in due.items():
            self.emit("error", f"sink {sink}: {total} events dropped ({reason})", "sink_events_dropped",
                      sink=sink, reason=reason, dropped=total)

    def flush(self) -> None:
        """Announce drops still waiting for their interval (at shutdown)."""
        with self._lock:
            pending = {k: v for k, v in self._drops.items() if v}
            self._drops = {}
        for (sink, reason), total in pending.items():
            self.emit("error", f"sink {sink}: {total} events dropped ({reason})", "sink_events_dropped",
                      scope="stdout", sink=sink, reason=reason, dropped=total)
