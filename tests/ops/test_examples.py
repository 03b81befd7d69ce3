"""The KServe and kustomize examples: rendered from the chart (no drift), valid, and safe.

kubernetes-validate checks every object it has a schema for; the InferenceService (a CRD) is parsed and
checked for what matters: raw deployment mode, the model on loopback in kserve-container, the guard as the
transformer-container KServe's Service targets, hardened containers. The kustomization is built with the
real kustomize in kubectl."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart._tools import find_tool, tool_or_skip
from tests.ops.paths import REPO

pytestmark = pytest.mark.slow

KSERVE = REPO / "deploy" / "kserve" / "inference-guard.yaml"
GUARD = REPO / "deploy" / "kustomize" / "guard" / "guard.yaml"
PATCH = REPO / "deploy" / "kustomize" / "guard" / "patch.yaml"
CRD_KINDS = {"InferenceService", "PrometheusRule", "ServiceMonitor"}
HARDENED = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}


def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def assert_hardened(container: dict[str, Any]) -> None:
    sc = container["securityContext"]
    for key, value in HARDENED.items():
        assert sc.get(key) == value, f"{container['name']}: securityContext.{key} is {sc.get(key)!r}"
    assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault", container["name"]


def assert_mounts_have_volumes(spec: dict[str, Any]) -> None:
    volumes = {v["name"] for v in spec["volumes"]}
    for c in spec["containers"] + spec.get("initContainers", []):
        missing = {m["name"] for m in c.get("volumeMounts", [])} - volumes
        assert not missing, f"{c['name']} mounts undeclared volumes {missing}"


def validate(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    tool = tool_or_skip("kubernetes-validate", "kubernetes-validate not installed (pip install -e '.[test]')")
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all([d for d in objects if d["kind"] not in CRD_KINDS]))
    proc = subprocess.run([tool, "--strict", "--quiet", "-k", "1.31", str(manifest)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr


class TestRendered:
    def test_committed_examples_are_what_the_chart_renders(self, tmp_path: Path) -> None:
        """deploy/render_examples.py with the real helm reproduces every committed example byte for byte."""
        helm = tool_or_skip("helm", "helm not installed: run scripts/install-helm.sh")
        proc = subprocess.run([sys.executable, str(REPO / "deploy" / "render_examples.py"), "--helm", helm,
                               "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        for committed in (KSERVE, GUARD, PATCH):
            rendered = tmp_path / committed.relative_to(REPO)
            assert rendered.read_text() == committed.read_text(), (
                f"{committed.relative_to(REPO)} differs from the chart: run python deploy/render_examples.py")


class TestKServe:
    def test_objects_with_schemas_validate(self, tmp_path: Path) -> None:
        """Every non-CRD object of the KServe example passes kubernetes-validate --strict."""
        validate(docs_of(KSERVE), tmp_path)

    def test_inference_service_puts_the_guard_in_front(self) -> None:
        """Raw deployment mode; kserve-container is the model on 127.0.0.1 with no declared port;
        transformer-container is the guard whose first port (what KServe's Service targets) is the guard port."""
        docs = docs_of(KSERVE)
        isvc = one(docs, "InferenceService")
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        predictor = isvc["spec"]["predictor"]
        assert [c["name"] for c in predictor["containers"]] == ["kserve-container", "transformer-container"]
        model, guard = predictor["containers"]
        env = {e["name"]: e.get("value") for e in model["env"]}
        assert env["MODEL_HOST"] == env["MLSERVER_HOST"] == "127.0.0.1"
        assert "ports" not in model
        assert guard["ports"][0] == {"name": "guard", "containerPort": 8080, "protocol": "TCP"}
        assert guard["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "guard-admin"}
        for c in predictor["containers"]:
            assert_hardened(c)
        assert predictor["securityContext"]["runAsNonRoot"] is True
        assert_mounts_have_volumes(predictor)
        assert not any("value" in e and "secret" in e["name"].lower() for e in guard["env"])

    def test_network_policy_and_admin_service_select_the_predictor_pods(self) -> None:
        """The NetworkPolicy and the admin Service select KServe's pod label of this InferenceService."""
        docs = docs_of(KSERVE)
        name = one(docs, "InferenceService")["metadata"]["name"]
        selector = {"serving.kserve.io/inferenceservice": name}
        assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == selector
        assert one(docs, "Service")["spec"]["selector"] == selector
        ports = [p["ports"][0]["port"] for p in one(docs, "NetworkPolicy")["spec"]["ingress"]]
        assert ports == [8080, 9090]

    def test_alerts_and_dashboard_come_along(self) -> None:
        """The example also carries the PrometheusRule and the dashboard ConfigMap."""
        docs = docs_of(KSERVE)
        assert one(docs, "PrometheusRule")["spec"]["groups"]
        assert any(d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
                   for d in docs)


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/kustomize``: the real kustomize applying the chart's patches."""
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) not installed: .ci/run installs Debian's kubernetes-client")
    proc = subprocess.run([kubectl, "kustomize", str(REPO / "deploy" / "kustomize")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class TestKustomize:
    def test_built_objects_validate(self, built: list[dict[str, Any]], tmp_path: Path) -> None:
        """kubectl kustomize output passes kubernetes-validate --strict."""
        validate(built, tmp_path)

    def test_the_patch_adds_the_guard_beside_the_model(self, built: list[dict[str, Any]]) -> None:
        """Your Deployment keeps its model container and gains the hardened guard and its volumes."""
        spec = one(built, "Deployment", "digits")["spec"]["template"]["spec"]
        containers = {c["name"]: c for c in spec["containers"]}
        assert sorted(containers) == ["guard", "model"]
        assert_hardened(containers["guard"])
        assert containers["model"]["image"] == "seldonio/mlserver:1.7.1-sklearn"
        assert_mounts_have_volumes(spec)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["fsGroup"] == 10001

    def test_your_service_now_targets_the_guard(self, built: list[dict[str, Any]]) -> None:
        """The Service port 80 targets the guard's named port; the NetworkPolicy selects your pods."""
        service = one(built, "Service", "digits")
        assert service["spec"]["ports"][0]["targetPort"] == "guard"
        policy = one(built, "NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "digits"}
        assert all(d["metadata"].get("namespace") == "models" for d in built)
