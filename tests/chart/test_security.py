"""Security properties of the rendered chart, read from the parsed manifests of every variant."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart._tools import CHART, CI_VALUES, by_kind, container, one, pod_spec

WORKLOAD_VARIANTS = [p for p in CI_VALUES if p.name != "injection-values.yaml"]
HARDENED = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
}
Render = Callable[..., list[dict[str, Any]]]


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix("-values.yaml") for p in paths]


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    loaded: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return loaded


@pytest.mark.parametrize("values", WORKLOAD_VARIANTS, ids=_ids(WORKLOAD_VARIANTS))
class TestWorkload:
    def test_guard_security_context_is_hardened(self, render: Render, values: Path) -> None:
        """The guard runs as UID/GID 10001, read-only root, no escalation, no caps, RuntimeDefault."""
        guard = container(pod_spec(render(values, kube_version="1.29.0")), "guard")
        ctx = guard["securityContext"]
        assert ctx.items() >= HARDENED.items()
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert "add" not in ctx["capabilities"]
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert ctx.get("privileged") is False

    def test_pod_security_context_pins_seccomp_and_fsgroup(self, render: Render, values: Path) -> None:
        """The pod is non-root with RuntimeDefault seccomp and fsGroup 10001 (reads the 0440 secret files)."""
        spec = pod_spec(render(values, kube_version="1.29.0"))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["fsGroup"] == 10001
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False

    def test_every_writable_path_is_an_empty_dir(self, render: Render, values: Path) -> None:
        """Writable mounts of the guard are emptyDirs; config, policy, secrets and profile are read-only."""
        spec = pod_spec(render(values, kube_version="1.29.0"))
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in container(spec, "guard")["volumeMounts"]:
            if not mount.get("readOnly"):
                assert "emptyDir" in volumes[mount["name"]], mount
        mounts = {m["mountPath"]: m for m in container(spec, "guard")["volumeMounts"]}
        assert mounts["/tmp"]["name"] == "guard-tmp"
        for leaf in ("config", "policy", "secrets"):
            path = f"/etc/inference-guard/{leaf}"
            assert mounts[path]["readOnly"] is True

    def test_model_binds_loopback_and_exposes_no_port(self, render: Render, values: Path) -> None:
        """The model gets 127.0.0.1 as its host, declares no ports; the guard's upstream is loopback."""
        docs = render(values, kube_version="1.29.0")
        model = container(pod_spec(docs), "model")
        env = {e["name"]: e.get("value") for e in model["env"]}
        assert env["MODEL_HOST"] == "127.0.0.1"
        assert "ports" not in model
        assert "0.0.0.0" not in " ".join([*model.get("command", []), *model.get("args", [])])
        assert _config(docs)["upstream"].startswith("http://127.0.0.1:")
        assert env["MODEL_PORT"] == _config(docs)["upstream"].rsplit(":", 1)[1]

    def test_service_targets_only_the_guard(self, render: Render, values: Path) -> None:
        """The model Service's only port targets the guard's named port, which is guard.port."""
        docs = render(values, kube_version="1.29.0")
        service = next(s for s in by_kind(docs, "Service") if not s["metadata"]["name"].endswith("-admin"))
        ports = service["spec"]["ports"]
        assert [p["targetPort"] for p in ports] == ["guard"]
        guard_ports = {p["name"]: p["containerPort"] for p in container(pod_spec(docs), "guard")["ports"]}
        assert guard_ports["guard"] == int(_config(docs)["listen"].rsplit(":", 1)[1])

    def test_policy_is_mounted_as_a_directory(self, render: Render, values: Path) -> None:
        """No mount uses subPath (it never sees ConfigMap updates); the policy is a directory mount."""
        spec = pod_spec(render(values, kube_version="1.29.0"))
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for mount in c.get("volumeMounts", []):
                assert "subPath" not in mount, (c["name"], mount)
                assert "subPathExpr" not in mount, (c["name"], mount)
        policy_volume = next(v for v in spec["volumes"] if v["name"] == "guard-policy")
        assert "items" not in policy_volume["configMap"]

    def test_probes_and_drain_use_the_admin_port(self, render: Render, values: Path) -> None:
        """Probes hit /livez and /readyz on the admin port; preStop pauses for draining."""
        guard = container(pod_spec(render(values, kube_version="1.29.0")), "guard")
        assert guard["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "guard-admin"}
        assert guard["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "guard-admin"}
        assert guard["startupProbe"]["httpGet"]["port"] == "guard-admin"
        assert guard["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        assert guard["resources"]["limits"]["memory"]
        assert guard["resources"]["requests"]["cpu"]


class TestNetworkPolicy:
    def test_admits_only_the_guard_and_admin_ports(self, standalone: list[dict[str, Any]]) -> None:
        """Ingress rules name exactly the guard and admin ports, never the model's."""
        netpol = one(standalone, "NetworkPolicy")
        assert netpol["spec"]["policyTypes"] == ["Ingress"]
        ports = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
        assert ports == {8080, 9090}
        assert all(rule["ports"] for rule in netpol["spec"]["ingress"]), "a rule without ports admits all"

    def test_selects_the_guarded_pods(self, standalone: list[dict[str, Any]]) -> None:
        """The NetworkPolicy selects the Deployment's pods."""
        netpol = one(standalone, "NetworkPolicy")
        labels = one(standalone, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()

    def test_follows_custom_ports(self, render: Render) -> None:
        """Moved guard/admin ports move the NetworkPolicy with them."""
        docs = render(CHART / "ci" / "redis-values.yaml", sets=("guard.port=8443", "guard.adminPort=9443"))
        ports = {p["port"] for rule in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
        assert ports == {8443, 9443}

    def test_injection_selects_the_parent_pods(self, render: Render) -> None:
        """In injection mode the NetworkPolicy selects injection.podSelector."""
        docs = render(CHART / "ci" / "injection-values.yaml")
        selector = one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/name": "fraud-model"}

    def test_can_be_turned_off(self, render: Render) -> None:
        """networkPolicy.enabled=false renders none."""
        assert not by_kind(render(CHART / "ci" / "networkpolicy-off-values.yaml"), "NetworkPolicy")


class TestSecrets:
    HMAC = "hmac-value-6f1c0d"
    TOKEN = "admin-token-9b2e4a"
    REDIS_PASSWORD = "redis-pass-3c7f1e"

    def _docs(self, render: Render) -> list[dict[str, Any]]:
        return render(CHART / "ci" / "redis-values.yaml", sets=(
            f"secrets.hmacKey={self.HMAC}", f"secrets.adminToken={self.TOKEN}",
            f"redis.url=redis://:{self.REDIS_PASSWORD}@redis:6379/0",
        ))

    def test_no_secret_value_in_any_config_map(self, render: Render) -> None:
        """The HMAC key, admin token and Redis password appear in no ConfigMap and no pod spec."""
        docs = self._docs(render)
        for doc in [*by_kind(docs, "ConfigMap"), *by_kind(docs, "Deployment")]:
            text = yaml.safe_dump(doc)
            for secret in (self.HMAC, self.TOKEN, self.REDIS_PASSWORD):
                assert secret not in text, (doc["kind"], doc["metadata"]["name"])

    def test_secrets_reach_the_guard_as_files(self, render: Render) -> None:
        """The Secret holds the values and the guard reads them through GUARD_*_FILE paths in its mount."""
        docs = self._docs(render)
        data = {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret")["data"].items()}
        assert data["hmac-key"] == self.HMAC
        assert data["admin-token"] == self.TOKEN
        assert self.REDIS_PASSWORD in data["redis-url"]
        env = {e["name"]: e["value"] for e in container(pod_spec(docs), "guard")["env"]}
        for name, key in (("GUARD_HMAC_KEY_FILE", "hmac-key"), ("GUARD_ADMIN_TOKEN_FILE", "admin-token"),
                          ("GUARD_REDIS_URL_FILE", "redis-url")):
            assert env[name] == f"/etc/inference-guard/secrets/{key}"

    def test_generated_hmac_key_is_long_and_random(self, render: Render) -> None:
        """Without a given key the chart generates a random 64-character one."""
        docs = render(CHART / "ci" / "standalone-values.yaml")
        key = base64.b64decode(one(docs, "Secret")["data"]["hmac-key"]).decode()
        assert len(key) == 64
        assert len(set(key)) > 20

    def test_existing_secret_is_mounted_not_rendered(self, render: Render) -> None:
        """With secrets.existingSecret no Secret is rendered and the named one is mounted."""
        docs = render(CHART / "ci" / "existing-secret-values.yaml")
        assert not by_kind(docs, "Secret")
        volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
        assert volumes["guard-secrets"]["secret"]["secretName"] == "guard-credentials"
        assert volumes["guard-policy"]["configMap"]["name"] == "guard-policy-prod"

    def test_admin_disabled_means_no_token(self, render: Render) -> None:
        """admin.enabled=false neither generates a token nor passes GUARD_ADMIN_TOKEN_FILE."""
        docs = render(CHART / "ci" / "networkpolicy-off-values.yaml")
        assert "admin-token" not in one(docs, "Secret")["data"]
        env = {e["name"] for e in container(pod_spec(docs), "guard")["env"]}
        assert "GUARD_ADMIN_TOKEN_FILE" not in env


class TestRestarts:
    def test_config_change_changes_the_checksum(self, render: Render) -> None:
        """A process-config change alters checksum/config (restart); a policy change does not (hot reload)."""
        base = CHART / "ci" / "redis-values.yaml"

        def checksum(*sets: str) -> str:
            docs = render(base, sets=sets)
            annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
            return str(annotations["checksum/config"])

        original = checksum()
        assert checksum("guard.config.read_timeout=12") != original
        assert checksum("policy=version: 1") == original
