"""Plot the dashboard's panels from a real Prometheus (Grafana cannot run here): one subplot per panel,
the panel's own queries and legends, over the given window."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.ops._queries import fill

PANELS = ("Decisions per second by action", "Alerts per second by rule", "Refused share",
          "Guard overhead beside upstream latency", "Sink events by state", "Session store",
          "Integrity state per model", "Readiness by condition")


def _legend(template: str, metric: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), template) or "value"


def plot_dashboard(prom: Any, dashboard: Path, out: Path, *, start: float, end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in json.loads(dashboard.read_text())["panels"] if p["type"] == "timeseries"}
    fig, axes = plt.subplots(4, 2, figsize=(14, 13), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            answer = prom.api("query_range", query=fill(target["expr"]), start=str(start), end=str(end), step="1")
            assert answer.get("status") == "success", f"{title}: {answer.get('error')}"
            for series in answer["data"]["result"]:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=_legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel(panel["fieldConfig"]["defaults"]["unit"], fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("inference-guard dashboard queries, plotted from the test's Prometheus "
                 "(benign clients, then a JBDA extraction attack that the guard blocks)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
