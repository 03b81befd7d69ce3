"""The injection worked example (examples/helm/fraud-model) adds the guard to a parent's own pod."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart._tools import CHART, REPO, by_kind, container, one, parse_docs, run, tool_or_skip

EXAMPLE = REPO / "examples" / "helm" / "fraud-model"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="module")
def parent_chart(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example parent after `helm dependency build`, in a copy keeping the repository layout."""
    repo = tmp_path_factory.mktemp("repo")
    root = repo / EXAMPLE.relative_to(REPO)
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    shutil.copytree(CHART, repo / CHART.relative_to(REPO))
    run([helm, "dependency", "build", str(root)])
    assert (root / "charts" / "inference-guard-0.1.0.tgz").is_file()
    return root


@pytest.fixture(scope="module")
def render_parent(helm: str, parent_chart: Path) -> Render:
    """helm template of the parent chart, with optional --set pairs."""
    def _render(*sets: str, kube_version: str = "1.31.0") -> list[dict[str, Any]]:
        cmd = [helm, "template", "fraud", str(parent_chart), "--namespace", "models",
               "--kube-version", kube_version]
        for pair in sets:
            cmd += ["--set", pair]
        return parse_docs(run(cmd).stdout)

    return _render


class TestInjectionExample:
    def test_lints_strictly(self, helm: str, parent_chart: Path) -> None:
        """The parent chart with the guard dependency passes helm lint --strict."""
        assert "0 chart(s) failed" in run([helm, "lint", "--strict", str(parent_chart)]).stdout

    @pytest.mark.parametrize("kube_version", ["1.29", "1.31"])
    def test_validates(
        self, render_parent: Render, tmp_path: Path, kube_version: str
    ) -> None:
        """Everything the parent renders (its Deployment, the guard's objects) passes kubernetes-validate."""
        validator = tool_or_skip("kubernetes-validate", "kubernetes-validate not installed")
        manifest = tmp_path / "parent.yaml"
        manifest.write_text(yaml.safe_dump_all(render_parent(kube_version=f"{kube_version}.0")))
        run([validator, "--strict", "--quiet", "-k", kube_version, str(manifest)])

    def test_guard_sits_beside_the_parents_model(self, render_parent: Render) -> None:
        """The parent's pod has its model container and the hardened guard, upstream = the parent's port."""
        docs = render_parent()
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["containers"]] == ["model", "guard"]
        guard = container(spec, "guard")
        assert guard["securityContext"]["runAsUser"] == 10001
        assert guard["securityContext"]["readOnlyRootFilesystem"] is True
        assert guard["image"] == f"inference-guard:{APP_VERSION}"
        config_map = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
        assert yaml.safe_load(config_map["data"]["config.yaml"])["upstream"] == "http://127.0.0.1:9000"
        assert "127.0.0.1" in container(spec, "model")["args"]

    def test_partials_and_dependency_agree_on_names(
        self, render_parent: Render
    ) -> None:
        """The volumes the partial mounts are exactly the ConfigMaps and Secret the dependency renders."""
        docs = render_parent()
        volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        config_maps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
        assert volumes["guard-config"]["configMap"]["name"] in config_maps
        assert volumes["guard-policy"]["configMap"]["name"] in config_maps
        assert volumes["guard-secrets"]["secret"]["secretName"] == one(docs, "Secret")["metadata"]["name"]

    def test_checksum_matches_the_rendered_config(self, render_parent: Render) -> None:
        """The parent pod's checksum/config is the sha256 of the config the dependency renders."""
        docs = render_parent()
        config_map = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
        text = config_map["data"]["config.yaml"].removesuffix("\n")
        annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/config"] == hashlib.sha256(text.encode()).hexdigest()

    def test_network_policy_and_service_follow_the_parent(
        self, render_parent: Render
    ) -> None:
        """The NetworkPolicy selects the parent's pods; the parent's Service targets the guard port."""
        docs = render_parent()
        pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        selector = one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "fraud-fraud-model")
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["guard"]

    def test_native_sidecar_moves_the_guard_to_init_containers(
        self, render_parent: Render
    ) -> None:
        """Switching the dependency to nativeSidecar needs no change in the parent's template."""
        spec = one(render_parent("inference-guard.guard.nativeSidecar=true", kube_version="1.29.0"),
                   "Deployment")["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["guard"]
        assert spec["initContainers"][0]["restartPolicy"] == "Always"
        assert [c["name"] for c in spec["containers"]] == ["model"]


def test_default_guard_tag_is_the_app_version() -> None:
    """values.yaml's guard.image.tag equals Chart.yaml's appVersion (the partials cannot read .Chart)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["guard"]["image"]["tag"] == APP_VERSION
