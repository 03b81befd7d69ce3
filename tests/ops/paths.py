"""Where the operator artefacts live (the chart's files are the source; deploy/ links them)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "inference-guard"
RULES = CHART / "files" / "prometheus" / "inference-guard.rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "inference-guard.rules.test.yaml"
DASHBOARD = CHART / "files" / "grafana" / "inference-guard.json"
