"""Integrity metrics, registered on the app's own registry (``inference_guard_integrity_*``).

Label values are bounded: ``check`` is canary | metadata | signature, ``model`` comes from the loaded
canary sets (``*`` for the signed model directory), never from requests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["IntegrityMetrics"]


class IntegrityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.failing = Gauge("inference_guard_integrity_failing",
                             "1 while a model fails an integrity check, 0 once it passes", ["check", "model"],
                             registry=r)
        self.checks = Counter("inference_guard_integrity_checks_total",
                              "Integrity checks run, by result (pass, fail, error = could not ask)",
                              ["check", "result"], registry=r)
        self.violations = Counter("inference_guard_integrity_violations_total",
                                  "Transitions from passing (or unknown) to failing", ["check"], registry=r)
        self.canary_mismatches = Gauge("inference_guard_integrity_canary_mismatches",
                                       "Canaries answered differently in the last check (best matching set)",
                                       ["model"], registry=r)
        self.last_check = Gauge("inference_guard_integrity_last_check_timestamp_seconds",
                                "Unix time of the last completed check", ["check"], registry=r)
        self.canary_sets = Gauge("inference_guard_integrity_canary_set_info",
                                 "Active canary sets (value 1)", ["model", "revision"], registry=r)
        self.reloads = Counter("inference_guard_integrity_canary_reloads_total", "Canary set reload attempts",
                               ["result"], registry=r)
