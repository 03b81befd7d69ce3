"""One sink's delivery machinery: bounded queue -> disk spool -> sender with retries.

The request path only calls ``offer`` (a non-blocking put on a bounded queue). An intake
thread appends queued lines to the spool; a sender thread reads the spool in order, sends
batches, retries failures with capped exponential backoff and jitter, and commits the
spool cursor only after the receiver acknowledged. So delivery is in order and at least
once per sink, and a sink that is down costs disk, not memory or latency.
"""

from __future__ import annotations

import queue
import random
import threading
import time

from guard_agent.sinks._alarm import Alarm
from guard_agent.sinks._config import SinkConfig
from guard_agent.sinks._metrics import SinkMetrics
from guard_agent.sinks._spool import Appended, Batch, Spool
from guard_agent.sinks._transport import DeliveryError, Transport

__all__ = ["SinkWorker"]

_INTAKE_BATCH = 2048


class SinkWorker:
    """Owns one sink's queue, spool, transport and two daemon threads."""

    def __init__(self, config: SinkConfig, transport: Transport, spool: Spool, metrics: SinkMetrics,
                 alarm: Alarm) -> None:
        self.config = config
        self.name = config.name
        self._transport = transport
        self._spool = spool
        self._alarm = alarm
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=config.queue_size)
        self._stop_intake = threading.Event()
        self._draining = threading.Event()
        self._abort = threading.Event()
        self._up = True
        self._down_since = 0.0
        self._dropped = 0             # this process's losses, and their number at the last success:
        self._dropped_before = 0      # the difference is what a recovering sink reports as lost
        self._drop_lock = threading.Lock()
        self._rng = random.Random()
        self._m_queued = metrics.events.labels(self.name, "queued")
        self._m_spooled = metrics.events.labels(self.name, "spooled")
        self._m_delivered = metrics.events.labels(self.name, "delivered")
        self._m_dropped = metrics.events.labels(self.name, "dropped")
        self._m_rejected = metrics.events.labels(self.name, "rejected")
        self._m_failures = metrics.failures.labels(self.name)
        self._m_up = metrics.up.labels(self.name)
        metrics.init_sink(self.name)
        metrics.backlog.labels(self.name).set_function(lambda: spool.pending + self._queue.qsize())
        metrics.spool_bytes.labels(self.name).set_function(lambda: spool.size_bytes)
        self._intake = threading.Thread(target=self._run_intake, name=f"guard-sink-{self.name}-intake", daemon=True)
        self._sender = threading.Thread(target=self._run_sender, name=f"guard-sink-{self.name}-send", daemon=True)

    def start(self) -> None:
        if self._spool.recovered:
            self._alarm.emit("info", f"sink {self.name}: {self._spool.recovered} events spooled by a previous run, "
                                     "delivering them first", "sink_spool_recovered",
                             sink=self.name, backlog=self._spool.recovered)
        self._intake.start()
        self._sender.start()

    # request path ----------------------------------------------------------------------------------
    def offer(self, line: bytes) -> bool:
        """Queue one line without blocking; False (counted, announced) when the queue is full."""
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self._count_dropped(1, "queue_full", queue_size=self.config.queue_size)
            return False
        self._m_queued.inc()
        return True

    # intake thread ---------------------------------------------------------------------------------
    def _run_intake(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop_intake.is_set():
                    return
                self._alarm.tick()
                continue
            lines = [first]
            while len(lines) < _INTAKE_BATCH:
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._spool_lines(lines)

    def _spool_lines(self, lines: list[bytes]) -> None:
        try:
            result = self._spool.append(lines)
        except Exception as exc:  # never let the intake thread die: count the loss and keep going
            result = Appended(0, f"spool_error: {type(exc).__name__}")
        if result.written:
            self._m_spooled.inc(result.written)
        lost = len(lines) - result.written
        if lost:
            self._count_dropped(lost, result.reason or "spool_full", spool_max_bytes=self.config.spool_max_bytes,
                                backlog=self._spool.pending)

    def _count_dropped(self, n: int, reason: str, **detail: object) -> None:
        with self._drop_lock:
            self._dropped += n
        self._m_dropped.inc(n)
        self._alarm.dropped(self.name, reason, n, **detail)

    # sender thread ---------------------------------------------------------------------------------
    def _run_sender(self) -> None:
        c = self.config
        while not self._abort.is_set():
            try:
                batch = self._spool.read(c.batch_max_events, c.batch_max_bytes, timeout=0.2)
                if batch is None:
                    if self._draining.is_set() and self._spool.pending == 0:
                        return
                    continue
                if not self._deliver(batch):
                    return
            except Exception as exc:  # a disk error reading the spool, or a bug: report, back off, go on
                self._m_failures.inc()
                self._mark_down(f"spool: {type(exc).__name__}: {exc}")
                if self._abort.wait(self.config.retry_max):
                    return
                self._spool.rewind()

    def _deliver(self, batch: Batch) -> bool:
        """Send until acknowledged (True) or told to abort (False: the batch stays in the spool)."""
        delay = self.config.retry_initial
        while not self._abort.is_set():
            try:
                rejected = self._transport.send(batch.lines) if batch.lines else 0
            except Exception as exc:  # DeliveryError, or an answer nobody foresaw: retry, never let the thread die
                reason = exc.reason if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
                retry_after = exc.retry_after if isinstance(exc, DeliveryError) else None
                self._m_failures.inc()
                self._mark_down(reason)
                if self._draining.is_set():   # shutting down with the sink away: the spool keeps the batch
                    return False
                wait = self._rng.uniform(delay / 2, delay)
                if retry_after is not None:
                    wait = max(wait, min(retry_after, self.config.retry_max))
                if self._abort.wait(wait):
                    return False
                delay = min(delay * 2, self.config.retry_max)
                continue
            self._spool.commit(batch)
            if rejected < len(batch.lines) or not batch.lines:   # a batch refused entirely is not "delivering"
                self._mark_up()
            if rejected:
                self._m_rejected.inc(rejected)
                self._alarm.dropped(self.name, "rejected_by_receiver", rejected)
            self._m_delivered.inc(len(batch.lines) - rejected)
            return True
        return False

    def _mark_down(self, reason: str) -> None:
        if self._up:
            self._up = False
            self._down_since = time.monotonic()
            self._m_up.set(0)
            self._alarm.emit("warning", f"sink {self.name} unreachable ({reason}): spooling events, retrying",
                             "sink_down", sink=self.name, reason=reason, backlog=self._spool.pending)

    def _mark_up(self) -> None:
        """After every acknowledged batch; announces the recovery (and the losses since the last success)."""
        lost = self._dropped - self._dropped_before
        self._dropped_before = self._dropped
        if not self._up:
            self._up = True
            self._m_up.set(1)
            self._alarm.emit("warning" if lost else "info", f"sink {self.name} delivering again"
                             + (f"; {lost} events were dropped while it was down" if lost else ""),
                             "sink_up", scope="all", sink=self.name,
                             down_seconds=round(time.monotonic() - self._down_since, 3),
                             backlog=self._spool.pending, dropped_while_down=lost)

    # shutdown --------------------------------------------------------------------------------------
    def stop_intake(self, timeout: float) -> None:
        """Move everything queued to the spool, then stop taking lines."""
        self._stop_intake.set()
        self._intake.join(timeout)

    def drain(self, deadline: float) -> None:
        """Deliver the backlog until ``deadline`` (monotonic); whatever is left stays spooled for the next start."""
        self._draining.set()
        self._sender.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        self._sender.join(0.5)
        if not self._sender.is_alive():
            self._transport.close()
            self._spool.close()

    @property
    def backlog(self) -> int:
        return self._spool.pending + self._queue.qsize()
