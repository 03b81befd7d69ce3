"""Prometheus metrics, one registry per app (tests run several apps in one process).

Names start with ``inference_guard_``. Labels stay low-cardinality: route labels
come from the route table, never from raw paths; sessions are never labels.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LabelledChildren", "Metrics"]

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LabelledChildren:
    """``metric.labels(*values)`` looked up once per label tuple: prometheus_client validates the values and
    takes a lock on every ``labels()`` call, and a request observes up to ~20 metrics (one per score). Only for
    metrics whose label values are the guard's own low-cardinality ones (routes, actions, score names), never
    client input; prometheus_client holds every child anyway."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("inference_guard_requests_total", "Requests by route, decision and status",
                                ["route", "action", "status"], registry=r)
        self.overhead = Histogram("inference_guard_overhead_seconds",
                                  "Time spent in the guard per request, excluding the upstream call",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("inference_guard_upstream_seconds", "Upstream call latency",
                                          ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("inference_guard_upstream_errors_total",
                                       "Upstream failures by kind", ["kind"], registry=r)
        self.policy_reloads = Counter("inference_guard_policy_reloads_total", "Policy reload attempts",
                                      ["result"], registry=r)
        self.profile_reloads = Counter("inference_guard_profile_reloads_total", "Profile reload attempts",
                                       ["result"], registry=r)
        self.policy_info = Gauge("inference_guard_policy_info", "The active policy revision (value 1)",
                                 ["revision"], registry=r)
        self.active_sessions = Gauge("inference_guard_active_sessions", "Sessions held in the local store",
                                     registry=r)
        self.inactive_trackers = Gauge("inference_guard_tracker_inactive",
                                       "Session scores that cannot work with this profile and these model answers "
                                       "(value 1; the reason is in /readyz and the log)", ["score"], registry=r)
        self.session_evictions = Counter("inference_guard_session_evictions_total",
                                         "Sessions dropped from the local store", ["reason"], registry=r)
        self.scoring_failures = Counter("inference_guard_scoring_failures_total",
                                        "Scoring errors and budget overruns", ["kind"], registry=r)
        self.scores = Histogram("inference_guard_score", "Distribution of calibrated scores",
                                ["score"], buckets=(0.5, 0.9, 0.99, 0.999, 0.9999, 1.0), registry=r)
        self.events_dropped = Counter("inference_guard_events_dropped_total",
                                      "Decision events dropped because the sink queue was full", registry=r)
        self.capture_dropped = Counter("inference_guard_capture_dropped_total",
                                       "Captured decisions dropped because the capture queue was full", registry=r)
        self.rejects = Counter("inference_guard_rejects_total", "Invalid requests refused before scoring",
                               ["reason"], registry=r)
        # the request path's metrics, children cached per label tuple
        self.requests_by = LabelledChildren(self.requests)
        self.overhead_by = LabelledChildren(self.overhead)
        self.upstream_latency_by = LabelledChildren(self.upstream_latency)
        self.scores_by = LabelledChildren(self.scores)
