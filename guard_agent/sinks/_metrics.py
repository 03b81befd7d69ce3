"""Sink metrics on the guard's registry (``metrics.registry``); the sink name is the only label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["STATES", "SinkMetrics"]

STATES = ("queued", "spooled", "delivered", "dropped", "rejected")


class SinkMetrics:
    """``inference_guard_sink_events_total{sink,state}`` and friends.

    queued: accepted from the request path; spooled: written to the disk spool; delivered:
    acknowledged by the receiver; dropped: lost by the guard (spool full, queue full or disk
    error; always announced on stdout); rejected: refused for good by the receiver (e.g. HTTP 400
    for that one event; announced too).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("inference_guard_sink_events", "Events per SIEM sink by delivery state",
                              ["sink", "state"], registry=registry)
        self.backlog = Gauge("inference_guard_sink_backlog_events", "Events spooled and not yet delivered",
                             ["sink"], registry=registry)
        self.spool_bytes = Gauge("inference_guard_sink_spool_bytes", "Bytes of the sink's disk spool",
                                 ["sink"], registry=registry)
        self.up = Gauge("inference_guard_sink_up", "1 while the last delivery attempt succeeded",
                        ["sink"], registry=registry)
        self.failures = Counter("inference_guard_sink_send_failures", "Failed delivery attempts (each is retried)",
                                ["sink"], registry=registry)

    def init_sink(self, sink: str) -> None:
        """Create every series at zero so dashboards and alerts see them before the first event."""
        for state in STATES:
            self.events.labels(sink, state)
        self.failures.labels(sink)
        self.up.labels(sink).set(1)
