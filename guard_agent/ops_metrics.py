"""Gauges refreshed at scrape time for dashboards and alerts: readiness per condition, the profile revision.

``/readyz`` answers probes, but Prometheus cannot alert on a probe; ``inference_guard_ready`` and
``inference_guard_ready_condition{check}`` carry the same verdicts (policy, profile, upstream, integrity,
accepting). ``inference_guard_profile_info{revision}`` mirrors ``inference_guard_policy_info`` for the
detector profile (``none`` = built-in checks only).

It also creates the alerting counters' series at zero (reload results, scoring failure kinds): a series
that first appears at 1 has no increase for ``increase()``/``rate()``, so the first rejected reload would
never raise an alert.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Gauge

from guard_agent.metrics import Metrics

__all__ = ["OpsMetrics"]


class OpsMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        for result in ("ok", "failed"):
            metrics.policy_reloads.labels(result)
            metrics.profile_reloads.labels(result)
        for kind in ("error", "budget"):
            metrics.scoring_failures.labels(kind)
        self.ready = Gauge("inference_guard_ready", "1 while every readiness condition holds (as /readyz)",
                           registry=registry)
        self.ready_condition = Gauge("inference_guard_ready_condition",
                                     "1 while this readiness condition holds, 0 while it keeps the guard unready",
                                     ["check"], registry=registry)
        self.profile_info = Gauge("inference_guard_profile_info", "The active detector profile revision (value 1)",
                                  ["revision"], registry=registry)
        self._profile_revision: str | None = None

    def refresh(self, checks: Mapping[str, bool], profile_revision: str | None) -> None:
        """Called by the admin listener before each scrape is rendered."""
        for check, ok in checks.items():
            self.ready_condition.labels(check).set(1 if ok else 0)
        self.ready.set(1 if all(checks.values()) else 0)
        label = profile_revision or "none"
        if label != self._profile_revision:
            self.profile_info.clear()
            self.profile_info.labels(label).set(1)
            self._profile_revision = label
