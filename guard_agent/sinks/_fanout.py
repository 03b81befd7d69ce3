"""The event sink the guard uses: stdout first, then a copy to each configured SIEM sink."""

from __future__ import annotations

import time
from collections.abc import Sequence

from guard_agent.events import EventSink, StreamSink
from guard_agent.metrics import Metrics
from guard_agent.settings import ConfigError, Settings
from guard_agent.sinks._alarm import Alarm
from guard_agent.sinks._config import HttpSinkConfig, SinkConfig, SyslogSinkConfig, parse_sinks
from guard_agent.sinks._http import HttpTransport
from guard_agent.sinks._metrics import SinkMetrics
from guard_agent.sinks._spool import Spool, SpoolLockedError
from guard_agent.sinks._syslog import SyslogTransport
from guard_agent.sinks._transport import Transport
from guard_agent.sinks._worker import SinkWorker

__all__ = ["FanoutSink", "make_sink", "make_transport"]


class FanoutSink:
    """Writes each line to the primary sink and offers it to every SIEM sink; never blocks."""

    def __init__(self, primary: EventSink, workers: Sequence[SinkWorker], alarm: Alarm) -> None:
        self.primary = primary
        self.workers = tuple(workers)
        self._alarm = alarm

    def write(self, line: bytes) -> bool:
        """The primary's answer: a SIEM sink that cannot take the line counts and announces it itself."""
        ok = self.primary.write(line)
        for worker in self.workers:
            worker.offer(line)
        return ok

    def close(self, timeout: float = 5.0) -> None:
        """Spool what is queued, deliver what can be delivered within ``timeout``, then close stdout."""
        deadline = time.monotonic() + timeout
        self._alarm.detach_all()   # from here on status lines go to stdout only: the sinks take no more
        for worker in self.workers:
            worker.stop_intake(max(0.1, deadline - time.monotonic()))
        for worker in self.workers:
            worker.drain(deadline)
        self._alarm.flush()
        left = {w.name: w.backlog for w in self.workers if w.backlog}
        if left:
            self._alarm.emit("warning", "sinks closed with undelivered events: they stay spooled for the next start",
                             "sink_spool_kept", scope="stdout", backlog=left)
        self.primary.close(max(0.5, deadline - time.monotonic()))


def make_transport(config: SinkConfig) -> Transport:
    """The transport for a validated sink config."""
    if isinstance(config, SyslogSinkConfig):
        return SyslogTransport(config)
    if isinstance(config, HttpSinkConfig):
        return HttpTransport(config)
    raise ConfigError(f"sink {config.name}: no transport for {type(config).__name__}")


def make_sink(settings: Settings, metrics: Metrics, *, primary: EventSink | None = None) -> EventSink:
    """stdout (or ``primary``) plus every sink of ``settings.sinks``; raises ConfigError on a bad sink config.

    With no sinks configured this is exactly the plain stdout sink.
    """
    configs = parse_sinks(settings.sinks, settings.spool_dir)
    if primary is None:
        primary = StreamSink(on_drop=metrics.events_dropped.inc)
    if not configs:
        return primary
    alarm = Alarm(primary, min_level=settings.log_level)
    sink_metrics = SinkMetrics(metrics.registry)
    workers: list[SinkWorker] = []
    spools: list[Spool] = []
    try:
        for config in configs:
            try:
                spool = Spool(config.spool_dir, max_bytes=config.spool_max_bytes)
            except SpoolLockedError as exc:
                raise ConfigError(f"sink {config.name}: {exc}") from None
            except OSError as exc:
                raise ConfigError(f"sink {config.name}: cannot use spool directory {config.spool_dir}: "
                                  f"{exc.strerror or exc}") from None
            spools.append(spool)
            try:
                transport = make_transport(config)
            except (OSError, ValueError) as exc:    # unreadable or invalid CA / client certificate
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"sink {config.name}: TLS setup failed: {exc}") from None
            workers.append(SinkWorker(config, transport, spool, sink_metrics, alarm))
    except BaseException:
        for spool in spools:
            spool.close()
        raise
    for worker in workers:
        alarm.attach(worker.name, worker.offer)
    for worker in workers:
        worker.start()
    return FanoutSink(primary, workers, alarm)
