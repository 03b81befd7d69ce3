"""Decision capture: every inference decision, unsampled, to size-bounded rotated JSON-lines files.

Opt-in (``GUARD_CAPTURE_DIR``). The request path only renders one line and puts
it on a bounded buffer; a writer thread does the file I/O, so a slow disk never
stalls a request. A full queue drops the record and counts it (``dropped``).

File format (one JSON object per line, ``capture-<UTC time>-<pid>-<run>-<seq>.jsonl``):

- a *policy* line, before the first decision of each policy revision in each
  file (so every file stands alone)::

    {"@timestamp": ..., "capture": {"v": 1, "kind": "policy", "revision": ...,
     "document": {...the parsed policy...}, "available_scores": [...], "profile_revision": ...}}

- a *decision* line: the decision event exactly as logged (ECS fields: ``event``,
  ``rule``, ``guard`` with every score, ``http``, ``url``, ``source``,
  ``threat``) plus ``capture: {"v": 1, "kind": "decision", "t": <request start,
  epoch seconds>, "exact_scores": <bool>}`` (true when ``guard.scores`` holds the
  unrounded scores rather than the event's 6-decimal ones); with ``GUARD_CAPTURE_KEY`` set also
  ``capture.features``: the request's feature matrix sealed with AES-256-GCM
  (see ``guard_agent.tuning.sealing``). Without a key no input value is written.

Files are created 0600 in a 0700 directory. When the current file would pass
``capture_max_bytes`` a new one is started; beyond ``capture_max_files`` the
oldest capture files in the directory are deleted (files of earlier runs
count, so restarts do not grow it): give each guard process its own directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
from aiohttp import web

from guard_agent.contracts import Capture
from guard_agent.state import GuardState
from guard_agent.tuning.sealing import derive_key, seal_features

__all__ = ["CAPTURE_VERSION", "CaptureWriter", "PolicyLine", "make_capture"]

CAPTURE_VERSION = 1
PolicyLine = Callable[[str], bytes | None]
"""Renders the policy line for a revision (None when that revision is no longer known)."""



def _now_iso(now: float | None = None) -> str:
    """ECS ``@timestamp`` (UTC, microseconds); strftime is several times cheaper than datetime.isoformat."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _default(value: Any) -> Any:
    """orjson fallback for the odd YAML scalar (dates) in a policy document."""
    return str(value)


class CaptureWriter(Capture):
    """The capture hook: renders on the request path, writes from one background thread."""

    poll_interval = 0.05  # seconds the writer sleeps when there is nothing to write

    def __init__(self, directory: str | Path, *, max_bytes: int, max_files: int, key: bytes | None = None,
                 policy_line: PolicyLine | None = None, max_queue: int = 65536,
                 on_error: Callable[[str], None] | None = None,
                 on_drop: Callable[[], None] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max(4096, int(max_bytes))
        self.max_files = max(1, int(max_files))
        self._key = key
        self._policy_line = policy_line or (lambda _rev: None)
        self._on_error = on_error
        self._on_drop = on_drop
        # a deque, not queue.Queue: append/popleft are atomic and the request path never pays for waking the
        # writer (Queue's condition variable costs more than rendering the line); the writer polls instead
        self._buf: deque[tuple[str, bytes]] = deque()
        self._max_queue = max_queue
        self._stop = threading.Event()
        self.dropped = 0
        self.written = 0
        self._seq = 0
        self._run_id = secrets.token_hex(3)  # containers restart with the same pid: names must still differ
        self._file: IO[bytes] | None = None
        self._size = 0
        self._revisions_in_file: set[str] = set()
        self._policies: OrderedDict[str, bytes] = OrderedDict()  # written by the request path only
        # files left by an earlier run count against the limit too, so restarts cannot grow the directory
        self._mine: list[Path] = sorted(self.directory.glob("capture-*.jsonl"), key=lambda p: p.stat().st_mtime)
        self._closed = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="guard-capture", daemon=True)
        self._thread.start()

    # ---- request path -------------------------------------------------------------------------------------
    def record(self, fields: Mapping[str, Any], features: Any, scores: Mapping[str, float] | None = None) -> None:
        """Render one decision line and queue it; never blocks, never raises into the request.

        ``scores``, when the caller passes them, are the unrounded scores ``decide()`` saw (the event rounds
        to 6 decimals, which can flip a comparison with a threshold like 1.0); they replace the event's.
        """
        if self._closed:
            return
        try:
            doc = dict(fields)
            doc["event"] = doc.pop("ecs_event", fields.get("event"))
            exact = scores is not None
            if scores is not None:
                doc["guard"] = {**doc.get("guard", {}), "scores": {k: float(v) for k, v in scores.items()}}
            duration_ns = (doc.get("event") or {}).get("duration") or 0
            now = time.time()
            capture: dict[str, Any] = {"v": CAPTURE_VERSION, "kind": "decision", "t": now - duration_ns / 1e9,
                                       "exact_scores": exact}
            if self._key is not None and features is not None:
                request_id = str(((doc.get("http") or {}).get("request") or {}).get("id", ""))
                capture["features"] = seal_features(np.asarray(features), self._key, associated=request_id)
            doc["@timestamp"] = _now_iso(now)
            doc["capture"] = capture
            line = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)
            revision = str((doc.get("guard") or {}).get("policy_revision") or "")
            if revision and revision not in self._policies:
                self._remember_policy(revision)
        except Exception:  # a capture bug must never fail a request
            self._drop()
            return
        self._put((revision, line))

    def _put(self, item: tuple[str, bytes]) -> None:
        if len(self._buf) >= self._max_queue:
            self._drop()
            return
        self._buf.append(item)

    # ---- writer thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            wrote = False
            while self._buf:
                revision, line = self._buf.popleft()
                wrote = True
                try:
                    self._write(revision, line)
                except OSError as exc:
                    self._drop()
                    self._close_file()
                    if not self._failing and self._on_error is not None:  # once per outage, not per record
                        self._on_error(f"capture write failed: {exc.strerror or exc}; dropping records until "
                                       "writes succeed again")
                    self._failing = True
                else:
                    self._failing = False
            if wrote and self._file is not None:
                try:
                    self._file.flush()
                except OSError:
                    self._close_file()
            if stopping:
                break
            self._stop.wait(self.poll_interval)
        self._close_file()

    def _write(self, revision: str, line: bytes) -> None:
        preamble = b""
        if revision and revision not in self._revisions_in_file:
            policy = self._policy_for(revision)
            if policy is not None:
                preamble = policy + b"\n"
        if self._file is None or self._size + len(preamble) + len(line) + 1 > self.max_bytes:
            self._rotate()
            if revision and preamble == b"":
                policy = self._policy_for(revision)
                preamble = policy + b"\n" if policy is not None else b""
        assert self._file is not None
        if preamble:
            self._file.write(preamble)
            self._size += len(preamble)
            self._revisions_in_file.add(revision)
        self._file.write(line + b"\n")
        self._size += len(line) + 1
        self.written += 1

    def _remember_policy(self, revision: str) -> None:
        """Render a revision's policy line once, on the request path, while that policy is the active one."""
        line = self._policy_line(revision)
        if line is None:
            return
        self._policies[revision] = line
        while len(self._policies) > 16:
            self._policies.popitem(last=False)

    def _policy_for(self, revision: str) -> bytes | None:
        return self._policies.get(revision)

    def _rotate(self) -> None:
        self._close_file()
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = self.directory / f"capture-{stamp}-{os.getpid()}-{self._run_id}-{self._seq:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = 0
        self._revisions_in_file = set()
        self._mine.append(path)
        while len(self._mine) > self.max_files:
            old = self._mine.pop(0)
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _drop(self) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        """This process's capture files, oldest first (after rotation deleted the ones beyond the limit)."""
        return list(self._mine)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, close the file, stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout)

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp lifecycle: nothing to start (the thread runs already); flush and close on shutdown."""
        yield
        await asyncio.to_thread(self.close)


def _policy_line_for(state: GuardState) -> PolicyLine:
    """Renders the active policy (the only one the process still holds) as a capture policy line."""

    def render(revision: str) -> bytes | None:
        policy = state.policies.current
        if policy.revision != revision:
            return None
        doc = {"@timestamp": _now_iso(), "capture": {
            "v": CAPTURE_VERSION, "kind": "policy", "revision": policy.revision, "source": policy.source,
            "document": dict(policy.document), "available_scores": sorted(state.available_scores()),
            "profile_revision": state.profile.revision}}
        return orjson.dumps(doc, default=_default)

    return render


def make_capture(state: GuardState) -> Capture | None:
    """The capture hook for ``build_state``; None when ``capture_dir`` is unset."""
    s = state.settings
    if not s.capture_dir:
        return None
    key = derive_key(s.capture_key) if s.capture_key else None
    writer = CaptureWriter(s.capture_dir, max_bytes=s.capture_max_bytes, max_files=s.capture_max_files, key=key,
                           policy_line=_policy_line_for(state),
                           on_error=lambda message: state.events.log("error", message),
                           on_drop=state.metrics.capture_dropped.inc)
    state.events.log("info", "decision capture enabled", guard={
        "capture_dir": s.capture_dir, "capture_features": key is not None,
        "capture_max_bytes": s.capture_max_bytes, "capture_max_files": s.capture_max_files})
    return writer
