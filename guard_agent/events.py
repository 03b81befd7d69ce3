"""Decision events: one ECS JSON object per line, for the SIEM and for policy replay.

structlog renders (orjson); a sink writes. The request path only puts bytes on a
bounded queue: a writer thread does the blocking write, so a slow stdout pipe
never stalls a request. If the queue is full the event is dropped and counted
(``inference_guard_events_dropped_total``) rather than blocking.

structlog's own ``event`` key is renamed to ``message`` because ECS uses
``event`` for the nested event object, which callers pass as ``ecs_event``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any, Protocol

import orjson
import structlog

__all__ = ["ALERT_ACTIONS", "CallbackSink", "DiagnosticsHandler", "EventLogger", "EventSink", "StreamSink",
           "build_decision_event", "random_id"]

_LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3, "critical": 4}
ALERT_ACTIONS = frozenset({"flag", "harden", "throttle", "block", "integrity_violation"})


_IDS_PER_READ = 256


class _RandomBytes(threading.local):
    """Each thread's unread random ids: ``random_id`` reads ``os.urandom`` 4 KiB at a time (one system call per
    256 ids instead of one per id; a request takes two), sets every id's version and variant bits and hex-encodes
    the whole block at once, so an id is one slice of a string. Per thread, so two threads never take the same
    bytes; emptied in a forked child, which must not repeat its parent's ids."""

    def __init__(self) -> None:
        self.hex = ""
        self.pos = 0

    def forget(self) -> None:
        """Drop the unread ids (in a forked child: its parent's)."""
        self.hex = ""
        self.pos = 0

    def refill(self) -> None:
        raw = bytearray(os.urandom(16 * _IDS_PER_READ))
        raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
        raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # RFC 4122 variant
        self.hex, self.pos = raw.hex(), 0


_random_bytes = _RandomBytes()
os.register_at_fork(after_in_child=_random_bytes.forget)


def random_id() -> str:
    """32 hex digits of a random version-4 UUID, as ``uuid.uuid4().hex`` (16 bytes of ``os.urandom``, without
    building a UUID object or a 128-bit integer)."""
    held = _random_bytes
    pos = held.pos
    if pos >= len(held.hex):
        held.refill()
        pos = 0
    held.pos = pos + 32
    return held.hex[pos : pos + 32]


class EventSink(Protocol):
    def write(self, line: bytes) -> bool:
        """Queue one rendered event (no trailing newline); False if it had to be dropped."""

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, then stop."""


class StreamSink:
    """Writes lines to a binary stream (stdout by default) from a background thread.

    The request path only appends to a deque (atomic under the GIL) and wakes the writer only when it sleeps
    idle: ``queue.Queue`` woke the writer thread for every event, and that condition-variable hand-off cost
    more CPU per request than rendering the event. A writer that found work lingers ``linger`` seconds before
    looking again, so under load it wakes once per batch rather than once per event.
    """

    def __init__(self, stream: IO[bytes] | None = None, *, max_queue: int = 65536,
                 on_drop: Callable[[], None] | None = None, linger: float = 0.005) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._buf: deque[bytes] = deque()
        self._max_queue = max_queue
        self._on_drop = on_drop
        self._linger = linger
        self._idle = False               # the writer is (about to be) waiting on _wake
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="guard-events", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> bool:
        if len(self._buf) >= self._max_queue:
            if self._on_drop is not None:
                self._on_drop()
            return False
        self._buf.append(line)
        if self._idle:  # cheap check first: Event.set takes a lock and notifies
            self._idle = False
            self._wake.set()
        return True

    def _run(self) -> None:
        buf = self._buf
        while True:
            if not buf:
                if self._closing:
                    return
                self._idle = True
                if not buf and not self._closing:  # re-checked after announcing: a write in between wakes us
                    self._wake.wait(1.0)  # the timeout is a backstop only
                self._wake.clear()
                self._idle = False
                continue
            batch = [buf.popleft()]
            while buf and len(batch) < 512:
                batch.append(buf.popleft())
            self._emit(batch)
            if not self._closing and self._linger > 0:
                time.sleep(self._linger)  # let a batch gather instead of waking per event

    def _emit(self, batch: list[bytes]) -> None:
        try:
            self._stream.write(b"\n".join(batch) + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            if self._on_drop is not None:
                for _ in batch:
                    self._on_drop()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the writer."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)


class CallbackSink:
    """Hands each rendered line to a function (tests, the demo)."""

    def __init__(self, callback: Callable[[bytes], None]) -> None:
        self._callback = callback

    def write(self, line: bytes) -> bool:
        self._callback(line)
        return True

    def close(self, timeout: float = 5.0) -> None:
        return None


def _rename_keys(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["message"] = event_dict.pop("event")
    ecs_event = event_dict.pop("ecs_event", None)
    if ecs_event is not None:
        event_dict["event"] = ecs_event
    return event_dict


class _Timestamps:
    """ISO-8601 UTC with microseconds; the part up to the second is formatted once per second (one tuple
    attribute, so a thread logging at the same time never pairs a second with another second's text)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = (-1, "")

    def __call__(self, now: float) -> str:
        second = int(now)
        held = self._held
        if held[0] != second:
            held = self._held = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        return f"{held[1]}.{int((now - second) * 1e6):06d}Z"


_timestamp = _Timestamps()


def _timestamp_and_level(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["@timestamp"] = _timestamp(time.time())
    event_dict.setdefault("log", {})["level"] = method
    return event_dict


def _fallback(value: Any) -> Any:
    """What structlog's JSONRenderer does with a value JSON has no form for: its ``__structlog__()``, else repr."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


class _SinkLogger:
    """The structlog 'wrapped logger': receives rendered bytes and hands them to the sink."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink

    def msg(self, message: bytes) -> None:
        self._sink.write(message)

    info = warning = error = debug = critical = msg


class EventLogger:
    """Renders and emits decision events and operational logs; alerts are never sampled."""

    def __init__(self, sink: EventSink, *, sample_allow: float = 1.0, rng: random.Random | None = None,
                 min_level: str = "info", observer: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self.sink = sink
        self._observer = observer  # sees each decision's fields as written (guard_agent.recent)
        self.sample_allow = sample_allow
        self._min_level = _LEVELS.get(min_level, 1)
        self._rng = rng or random.Random()
        self._log = structlog.wrap_logger(
            _SinkLogger(sink),
            processors=[
                _rename_keys,
                _timestamp_and_level,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            cache_logger_on_first_use=True,  # else every event re-assembles the bound logger from its config
        )

    def keep(self, action: str) -> bool:
        """Whether an event with this action is written: alerts always, allow events at ``sample_allow``.
        Callers ask first, so a sampled-out event is never built."""
        return action != "allow" or self.sample_allow >= 1.0 or self._rng.random() < self.sample_allow

    def decision(self, fields: Mapping[str, Any], message: str, *, level: str = "info") -> bool:
        """Emit one decision event; returns False when an allow event was sampled out."""
        if not self.keep(fields.get("ecs_event", {}).get("action", "")):
            return False
        self.write(fields, message, level=level)
        return True

    def write(self, fields: Mapping[str, Any], message: str, *, level: str = "info") -> None:
        """Emit one decision event already past sampling.

        The object ``log()``'s structlog chain would render (same keys, same order: ``_rename_keys``, then
        ``_timestamp_and_level``, then orjson), built directly: one request's event is not worth the chain's
        bound-logger dispatch, keyword splat and dict copies."""
        if self._observer is not None:
            self._observer(fields)
        doc = dict(fields)  # a copy (the observer and the capture keep ``fields``), in the same key order
        ecs_event = doc.pop("ecs_event", None)
        doc["message"] = message
        if ecs_event is not None:
            doc["event"] = ecs_event
        doc["@timestamp"] = _timestamp(time.time())
        doc.setdefault("log", {})["level"] = level
        self.sink.write(orjson.dumps(doc, default=_fallback))

    def log(self, level: str, message: str, **fields: Any) -> None:
        """Operational events (reloads, start, errors) in the same stream, same shape."""
        if _LEVELS.get(level, 1) < self._min_level:
            return
        ecs = {"kind": "event", "category": ["configuration" if "policy" in message else "process"],
               **fields.pop("ecs_event", {})}
        getattr(self._log, level)(message, ecs_event=ecs, **fields)

    def close(self) -> None:
        self.sink.close()


def build_decision_event(
    *,
    action: str,
    outcome: str,
    rule: str,
    mode: str,
    enforced: bool,
    session: str | None,
    model: str | None,
    rows: int,
    scores: Mapping[str, float],
    policy_revision: str,
    profile_revision: str | None,
    request_id: str,
    method: str,
    status: int,
    path: str,
    source_ip: str | None,
    technique: str | None,
    started: float,
    extra_guard: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ECS fields of DESIGN.md for one request (never raw inputs or keys)."""
    kind = "alert" if action in ALERT_ACTIONS else "event"
    guard: dict[str, Any] = {
        "mode": mode,
        "enforced": enforced,
        "session": session,
        "model": model,
        "rows": rows,
        "scores": {k: round(float(v), 6) for k, v in scores.items()},
        "policy_revision": policy_revision,
        "profile_revision": profile_revision,
    }
    if extra_guard:
        guard.update(extra_guard)
    fields: dict[str, Any] = {
        "ecs_event": {
            "id": random_id(),
            "kind": kind,
            "category": ["intrusion_detection"],
            "type": ["denied"] if outcome == "failure" else ["allowed"],
            "action": action,
            "outcome": outcome,
            "duration": int((time.perf_counter() - started) * 1e9),
        },
        "rule": {"name": rule},
        "guard": guard,
        "http": {"request": {"id": request_id, "method": method}, "response": {"status_code": status}},
        "url": {"path": path},
        "source": {"ip": source_ip},
    }
    if technique:
        fields["threat"] = {"framework": "MITRE ATLAS", "technique": {"id": technique}}
    return fields


_MAX_DIAGNOSTIC = 300
_WARNING = re.compile(r"(\w+Warning): ([^\n]*)")


class DiagnosticsHandler(logging.Handler):
    """Python logging (aiohttp, asyncio) and warnings (numpy's ``RuntimeWarning``) as events in the one stream.

    Stdout is one JSON object per line, always: a library's traceback or warning text must not break that, and it
    may quote what a client sent (a header line, a body). So only the logger, the record's message template (not
    its arguments) and the exception's type are kept; never the traceback or the exception's message.
    """

    def __init__(self, events: EventLogger) -> None:
        super().__init__(logging.WARNING)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            error: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                error["type"] = record.exc_info[0].__name__
            if record.name == "py.warnings":  # "file:line: Category: text\n  source line": not the path or source
                found = _WARNING.search(record.getMessage())
                text = f"{found.group(1)}: {found.group(2)}" if found else "warning"
            else:
                text = str(record.msg)
            level = "error" if record.levelno >= logging.ERROR else "warning"
            self._events.log(level, text[:_MAX_DIAGNOSTIC], ecs_event={"category": ["process"]}, error=error)
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)

    def install(self) -> None:
        """Route the root logger and warnings here (and nowhere else) for the life of the process."""
        logging.captureWarnings(True)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self)
