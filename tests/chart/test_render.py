"""Every CI variant of the chart lints, renders and validates against real Kubernetes schemas."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart._tools import CHART, CI_VALUES, CRD_KINDS, KUBE_VERSIONS, by_kind, one, run, tool_or_skip

EXPECTED_VARIANTS = {
    "standalone", "injection", "redis", "native-sidecar", "existing-secret", "networkpolicy-off",
}


@pytest.fixture(scope="module")
def kubernetes_validate() -> str:
    """The kubernetes-validate CLI (a test dependency of the project)."""
    return tool_or_skip("kubernetes-validate", "kubernetes-validate not installed (pip install -e '.[test]')")


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix("-values.yaml") for p in paths]


class TestVariants:
    def test_ci_values_cover_the_documented_variants(self) -> None:
        """ci/ holds one values file per deployment variant the issue names."""
        assert set(_ids(CI_VALUES)) >= EXPECTED_VARIANTS

    @pytest.mark.parametrize("values", CI_VALUES, ids=_ids(CI_VALUES))
    @pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
    def test_lint_strict(self, helm: str, values: Path, kube_version: str) -> None:
        """helm lint --strict passes for the variant (warnings count as failures)."""
        proc = run([helm, "lint", "--strict", str(CHART), "-f", str(values), "--kube-version", kube_version])
        assert "0 chart(s) failed" in proc.stdout

    @pytest.mark.parametrize("values", CI_VALUES, ids=_ids(CI_VALUES))
    @pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
    def test_manifests_validate_strictly(
        self,
        render: Callable[..., list[dict[str, Any]]],
        kubernetes_validate: str,
        tmp_path: Path,
        values: Path,
        kube_version: str,
    ) -> None:
        """Every rendered non-CRD object passes kubernetes-validate --strict for that version."""
        docs = [d for d in render(values, kube_version=kube_version) if d["kind"] not in CRD_KINDS]
        assert docs, "nothing rendered"
        manifest = tmp_path / "rendered.yaml"
        manifest.write_text(yaml.safe_dump_all(docs))
        minor = kube_version.rsplit(".", 1)[0]
        proc = run([kubernetes_validate, "--strict", "--quiet", "-k", minor, str(manifest)], check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ERROR" not in proc.stdout

    def test_validator_rejects_an_unknown_field(self, kubernetes_validate: str, tmp_path: Path) -> None:
        """Control: the validator does fail on a misspelt field, so a pass above means something."""
        manifest = tmp_path / "bad.yaml"
        manifest.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"ports": [{"port": 80, "targetPort": "guard", "protcol": "TCP"}]},
        }))
        proc = run([kubernetes_validate, "--strict", "--quiet", "-k", "1.31", str(manifest)], check=False)
        assert proc.returncode != 0


class TestModes:
    def test_standalone_renders_the_workload(self, standalone: list[dict[str, Any]]) -> None:
        """Standalone renders Deployment, Service, NetworkPolicy, PDB, HPA, ServiceMonitor and config."""
        kinds = {d["kind"] for d in standalone}
        assert kinds >= {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget",
                         "HorizontalPodAutoscaler", "ServiceMonitor", "ConfigMap", "Secret", "ServiceAccount"}

    def test_injection_renders_no_workload(self, render: Callable[..., list[dict[str, Any]]]) -> None:
        """Injection mode leaves the workload to the parent: no Deployment, PDB, HPA or ServiceAccount."""
        docs = render(CHART / "ci" / "injection-values.yaml")
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceAccount"}
        assert {"ConfigMap", "Secret", "NetworkPolicy"} <= kinds
        names = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
        assert names == {"fraud-model-guard-config", "fraud-model-guard-policy"}

    def test_native_sidecar_is_a_restartable_init_container(
        self, render: Callable[..., list[dict[str, Any]]]
    ) -> None:
        """With nativeSidecar the guard is an init container with restartPolicy Always, after the copier."""
        docs = render(CHART / "ci" / "native-sidecar-values.yaml", kube_version="1.29.0")
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        inits = [c["name"] for c in spec["initContainers"]]
        assert inits == ["guard-profile", "guard"]
        assert spec["initContainers"][1]["restartPolicy"] == "Always"
        assert [c["name"] for c in spec["containers"]] == ["model"]

    def test_service_monitor_scrapes_the_admin_service(self, standalone: list[dict[str, Any]]) -> None:
        """The ServiceMonitor selects the admin Service by its labels and scrapes its named port."""
        monitor = one(standalone, "ServiceMonitor")
        admin = next(s for s in by_kind(standalone, "Service") if s["metadata"]["name"].endswith("-admin"))
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= admin["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in admin["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
