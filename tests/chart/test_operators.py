"""The chart's operator objects and modes: dashboard ConfigMap, PrometheusRule, KServe and the kustomize patch.

The dashboard and the rules are the chart's files (deploy/ links them): the objects must carry them
unchanged, and stay off unless asked for."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart._tools import CHART, REPO, by_kind, helm_template, one, parse_docs, run

Render = Callable[..., list[dict[str, Any]]]
DASHBOARD = CHART / "files" / "grafana" / "inference-guard.json"
RULES = CHART / "files" / "prometheus" / "inference-guard.rules.yaml"
INJECTION = ("workload.enabled=false", "injection.podSelector.app=digits")
KSERVE = ("workload.enabled=false", "kserve.enabled=true", "model.image.repository=seldonio/mlserver")
EXAMPLES = (REPO / "deploy" / "kserve" / "values.yaml", REPO / "deploy" / "kustomize" / "values.yaml")


class TestDashboardAndRules:
    def test_off_by_default(self, render: Render) -> None:
        """Without asking, no dashboard ConfigMap and no PrometheusRule (they need Grafana / the operator CRDs)."""
        docs = render(sets=("model.image.repository=x",))
        assert not by_kind(docs, "PrometheusRule")
        assert not [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]

    def test_dashboard_configmap_carries_the_file_and_the_sidecar_label(self, standalone: list[dict[str, Any]]) -> None:
        """The ConfigMap holds the dashboard JSON unchanged, with the Grafana sidecar's label and folder."""
        cm = next(d for d in by_kind(standalone, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Security"}
        assert json.loads(cm["data"]["inference-guard.json"]) == json.loads(DASHBOARD.read_text())

    def test_prometheus_rule_is_the_rule_file(self, standalone: list[dict[str, Any]]) -> None:
        """The PrometheusRule's spec is the plain rule file's content, with the release label Prometheus selects."""
        rule = one(standalone, "PrometheusRule")
        assert rule["spec"] == yaml.safe_load(RULES.read_text())
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


class TestKServeMode:
    def test_renders_an_inference_service_and_no_deployment(self, render: Render) -> None:
        """kserve.enabled: an InferenceService, the guard's ConfigMaps and NetworkPolicy; no Deployment or
        model Service of the chart's own."""
        docs = render(sets=KSERVE)
        assert one(docs, "InferenceService")["spec"]["predictor"]["containers"][1]["name"] == "transformer-container"
        assert not by_kind(docs, "Deployment")
        assert not [d for d in by_kind(docs, "Service") if "guard-admin" not in str(d["metadata"].get("labels"))]
        assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == {
            "serving.kserve.io/inferenceservice": "demo-inference-guard"}

    @pytest.mark.parametrize(("sets", "message"), [
        (("kserve.enabled=true", "model.image.repository=x"), "set workload.enabled=false"),
        ((*KSERVE, "guard.nativeSidecar=true"), "kserve.enabled needs guard.nativeSidecar=false"),
        (("workload.enabled=false", "kserve.enabled=true"), "model.image.repository is required"),
        ((*KSERVE, "injection.patch.enabled=true", "injection.patch.deployment=d"), "exclude each other"),
        ((*KSERVE, "model.args={--host,0.0.0.0}"), "must bind 127.0.0.1"),
    ])
    def test_invalid_combinations_fail_with_a_reason(self, helm: str, sets: tuple[str, ...], message: str) -> None:
        """Combinations that cannot work fail to render, saying why."""
        proc = helm_template(helm, sets=sets, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


class TestInjectionPatch:
    def test_patch_adds_the_guard_container_to_the_named_deployment(self, render: Render) -> None:
        """injection.patch: a Deployment patch named as given, holding only the guard's pod-spec pieces, and a
        Service patch pointing the given port at the guard."""
        docs = render(sets=(*INJECTION, "injection.patch.enabled=true", "injection.patch.deployment=digits",
                            "injection.patch.service=digits"))
        patch = one(docs, "Deployment")
        assert patch["metadata"]["name"] == "digits"
        spec = patch["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["containers"]] == ["guard"]
        assert {"guard-config", "guard-policy", "guard-secrets"} <= {v["name"] for v in spec["volumes"]}
        assert one(docs, "Service")["spec"]["ports"] == [{"port": 80, "targetPort": "guard"}]

    @pytest.mark.parametrize(("sets", "message"), [
        (("injection.patch.enabled=true", "injection.patch.deployment=d", "model.image.repository=x"),
         "set workload.enabled=false"),
        ((*INJECTION, "injection.patch.enabled=true"), "needs injection.patch.deployment"),
    ])
    def test_invalid_patch_values_fail(self, helm: str, sets: tuple[str, ...], message: str) -> None:
        """A patch without a target, or beside the chart's own Deployment, fails to render."""
        proc = helm_template(helm, sets=sets, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("values", EXAMPLES, ids=["kserve", "kustomize"])
def test_example_values_lint_strictly(helm: str, values: Path) -> None:
    """The deploy/ examples' values pass helm lint --strict (the examples are rendered from them)."""
    proc = run([helm, "lint", "--strict", str(CHART), "-f", str(values)])
    assert "0 chart(s) failed" in proc.stdout
    assert parse_docs(helm_template(helm, values=(values,)).stdout)
