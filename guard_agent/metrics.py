"""Prometheus metrics, one registry per app (tests run several apps in one process).

Names start with ``inference_guard_``. Labels stay low-cardinality: route labels
come from the route table, never from raw paths; sessions are never labels.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["LabelledCounter", "LabelledHistogram", "Metrics"]

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LabelledCounter:
    """A counter with labels, exposed as prometheus_client's ``Counter`` exposes it (``_total``, ``_created``,
    same text), counted in a plain dict.

    Every request counts once or twice (requests, decisions); through prometheus_client each is a child lookup
    and a locked increment. Here ``inc`` is one dict lookup and one addition. Only the event loop's thread
    counts; a scrape reads a copy. Label values must be the guard's own low-cardinality ones, never client
    input."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total")
        self._doc = documentation
        self._labels = labels
        self._counts: dict[tuple[str, ...], list[float]] = {}  # label values -> [count, created]
        registry.register(self)

    def inc(self, *values: str) -> None:
        """Count one for these label values (in the order of ``labels``)."""
        entry = self._counts.get(values)
        if entry is None:
            entry = self._counts[values] = [0.0, time.time()]
        entry[0] += 1.0

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._doc, labels=self._labels)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for values, (count, created) in list(self._counts.items()):
            family.add_metric(values, count, created=created)
        yield family


class LabelledHistogram:
    """A histogram with one label, exposed as prometheus_client's ``Histogram`` exposes it (buckets,
    ``_count``, ``_sum``, ``_created``, same text), counted in plain lists.

    A request observes one value per score (about 20 with every detector and tracker on) and two latencies;
    through prometheus_client each is a ``labels()`` lookup and two locked increments, tens of µs per request
    together. Here it is one ``bisect`` and two list additions. Only the event loop's thread observes; a scrape
    reads a copy, so it never sees a bucket ahead of the count by more than the requests of that instant."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry, *, label: str) -> None:
        self._name = name
        self._doc = documentation
        self._label = label
        self._bounds = (*buckets, float("inf")) if buckets[-1] != float("inf") else tuple(buckets)
        self._les = tuple(floatToGoString(b) for b in self._bounds)  # type: ignore[no-untyped-call]
        self._series: dict[str, tuple[list[int], list[float], float]] = {}  # score -> (counts, [sum], created)
        registry.register(self)

    def observe(self, labelled: str, value: float) -> None:
        """One value into the series of label value ``labelled``."""
        series = self._series.get(labelled)
        if series is None:
            series = self._series[labelled] = ([0] * len(self._bounds), [0.0], time.time())
        series[0][bisect_left(self._bounds, value)] += 1  # the first bucket whose bound is >= value
        series[1][0] += value

    def observe_all(self, values: Mapping[str, float]) -> None:
        """One value per label value (a request's scores)."""
        for labelled, value in values.items():
            self.observe(labelled, value)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=[self._label])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=[self._label])
        created = Metric(self._name + "_created", self._doc, "gauge")
        for labelled, (counts, total, born) in list(self._series.items()):
            running, cumulative = 0, []
            for le, n in zip(self._les, list(counts), strict=True):
                running += n
                cumulative.append((le, float(running)))
            family.add_metric([labelled], cumulative, total[0])
            created.add_sample(self._name + "_created", {self._label: labelled}, born)
        yield family
        if self._series:
            yield created


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LabelledCounter("inference_guard_requests_total", "Requests by route, decision and status",
                                        ("route", "action", "status"), r)
        self.overhead = LabelledHistogram("inference_guard_overhead_seconds",
                                          "Time spent in the guard per request, excluding the upstream call",
                                          _LATENCY_BUCKETS, r, label="route")
        self.upstream_latency = LabelledHistogram("inference_guard_upstream_seconds", "Upstream call latency",
                                                  _LATENCY_BUCKETS, r, label="route")
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
        self.scores = LabelledHistogram("inference_guard_score", "Distribution of calibrated scores",
                                        (0.5, 0.9, 0.99, 0.999, 0.9999, 1.0), r, label="score")
        self.events_dropped = Counter("inference_guard_events_dropped_total",
                                      "Decision events dropped because the sink queue was full", registry=r)
        self.capture_dropped = Counter("inference_guard_capture_dropped_total",
                                       "Captured decisions dropped because the capture queue was full", registry=r)
        self.rejects = Counter("inference_guard_rejects_total", "Invalid requests refused before scoring",
                               ["reason"], registry=r)
