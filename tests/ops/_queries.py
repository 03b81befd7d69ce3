"""The PromQL of the dashboard and the rule files, and the metric names it reads."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The values a Grafana user would pick: one namespace and pod (the test Prometheus gives the target those
# labels, as Kubernetes service discovery does), every model, Grafana's rate interval for a 1 s scrape.
VARIABLES = {"$__rate_interval": "15s", "$namespace": "models", "$pod": "digits-0", "$model": ".*"}
_NAME = re.compile(r"\b(inference_guard_[a-z0-9_]+)\b")


@dataclass(frozen=True)
class Query:
    where: str           # "panel <title>" or "alert <name>" / "record <name>" / "variable <name>"
    expr: str
    legend: str = ""


def dashboard_queries(path: Path) -> list[Query]:
    """Every panel target and every query variable of the dashboard, with the variables filled in."""
    doc = json.loads(path.read_text())
    out = [Query(f"panel {p['title']}", fill(t["expr"]), t.get("legendFormat", ""))
           for p in doc["panels"] for t in p.get("targets", ())]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert match, f"variable {var['name']}: not a label_values() query"
            out.append(Query(f"variable {var['name']}", fill(match.group(1))))
    return out


def rule_queries(path: Path) -> list[Query]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return [Query(f"alert {r['alert']}" if "alert" in r else f"record {r['record']}", r["expr"])
            for group in doc["groups"] for r in group["rules"]]


def fill(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(queries: Iterable[Query]) -> set[str]:
    """The guard's metric names the expressions read (recorded ``inference_guard:...`` series excluded)."""
    return {name for q in queries for name in _NAME.findall(q.expr)}


def unknown_metrics(queries: Iterable[Query], exported: set[str]) -> dict[str, list[str]]:
    """Metric name -> where it is used, for names the guard does not export."""
    missing: dict[str, list[str]] = {}
    for q in queries:
        for name in _NAME.findall(q.expr):
            if name not in exported:
                missing.setdefault(name, []).append(q.where)
    return missing
