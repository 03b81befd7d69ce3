"""values.schema.json and the chart's fail checks refuse values that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chart._tools import CHART, helm_template

REDIS = CHART / "ci" / "redis-values.yaml"
INJECTION = CHART / "ci" / "injection-values.yaml"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


class TestSchema:
    @pytest.mark.parametrize(
        ("pair", "expected"),
        [
            ("guard.port=eighty", "guard.port: Invalid type"),
            ("workload.replicas=many", "workload.replicas: Invalid type"),
            ("networkPolicy.enabled=perhaps", "networkPolicy.enabled: Invalid type"),
            ("guard.config.max_body_bytes=huge", "max_body_bytes: Invalid type"),
            ("guard.config.log_level=loud", "log_level"),
            ("profile.source=configmap", "profile.source"),
            ("guard.port=70000", "guard.port"),
        ],
    )
    def test_rejects_wrong_types_and_values(self, helm: str, pair: str, expected: str) -> None:
        """A value of the wrong type or outside its range fails before anything renders."""
        proc = helm_template(helm, values=[REDIS], sets=[pair], check=False)
        assert proc.returncode != 0
        assert expected in proc.stderr

    @pytest.mark.parametrize(
        "pair",
        [
            "guard.bogus=1",
            "modle.port=8081",
            "networkPolicy.ingresFrom[0].podSelector.matchLabels.a=b",
            # secrets and chart-owned paths are not process-config keys
            "guard.config.hmac_key=abc",
            "guard.config.admin_token=abc",
            "guard.config.redis_url=redis://x",
            "guard.config.upstream=http://10.0.0.1",
        ],
    )
    def test_rejects_unknown_keys(self, helm: str, pair: str) -> None:
        """A misspelt key, or a secret placed in the process config, is refused by the schema."""
        proc = helm_template(helm, values=[REDIS], sets=[pair], check=False)
        assert proc.returncode != 0
        assert "Additional property" in proc.stderr

    def test_every_object_is_closed(self) -> None:
        """Every object with declared properties forbids additional ones (so typos cannot pass silently)."""
        def walk(node: object, where: str) -> None:
            if isinstance(node, dict):
                if "properties" in node:
                    assert node.get("additionalProperties") is False, where
                for key, child in node.items():
                    walk(child, f"{where}/{key}")
            elif isinstance(node, list):
                for i, child in enumerate(node):
                    walk(child, f"{where}/{i}")

        walk(SCHEMA, "#")


class TestImpossibleCombinations:
    @pytest.mark.parametrize(
        ("values", "pairs", "message"),
        [
            (REDIS, ["model.port=8080"], "must differ"),
            (REDIS, ["guard.adminPort=8080"], "must differ"),
            (REDIS, ["model.image.repository="], "model.image.repository is required"),
            (REDIS, ["model.args[0]=--host=0.0.0.0"], "the model must bind 127.0.0.1"),
            (REDIS, ["model.env[0].name=MODEL_HOST", "model.env[0].value=0.0.0.0"], "pins it to 127.0.0.1"),
            (REDIS, ["redis.url="], "redis.enabled needs redis.url"),
            (REDIS, ["redis.url=http://redis:6379"], "must start with redis://"),
            (REDIS, ["secrets.existingSecret=creds"], "redis.url is ignored with secrets.existingSecret"),
            (REDIS, ["redis.enabled=false"], "redis.url is set but redis.enabled is false"),
            (REDIS, ["policy=version: 1", "existingPolicyConfigMap=p"], "not both"),
            (REDIS, ["guard.env[0].name=GUARD_LISTEN", "guard.env[0].value=0.0.0.0:1"], "use guard.port instead"),
            (REDIS, ["guard.env[0].name=GUARD_HMAC_KEY", "guard.env[0].value=k"], "use secrets instead"),
            (REDIS, ["policy=just text"], "policy is not a YAML mapping"),
            (REDIS, ["profile.source=secret"], "profile.secret.name"),
            (REDIS, ["profile.source=image"], "profile.image.repository"),
            (REDIS, ["podDisruptionBudget.enabled=true", "podDisruptionBudget.maxUnavailable=1"],
             "minAvailable or maxUnavailable, not both"),
            (REDIS, ["autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"],
             "exceeds autoscaling.maxReplicas"),
            (REDIS, ["autoscaling.enabled=true"], "needs model.resources.requests.cpu"),
            (REDIS, ["workload.terminationGracePeriodSeconds=5"], "killed mid-drain"),
            (INJECTION, ["injection.podSelector=null"], "injection.podSelector is required"),
            (INJECTION, ["podDisruptionBudget.enabled=true"], "parent chart owns the workload"),
            (INJECTION, ["autoscaling.enabled=true"], "parent chart owns the workload"),
        ],
    )
    def test_fails_with_a_clear_message(
        self, helm: str, values: Path, pairs: list[str], message: str
    ) -> None:
        """A combination that cannot work stops the render with a message naming the keys involved."""
        proc = helm_template(helm, values=[values], sets=pairs, check=False)
        assert proc.returncode != 0
        assert message in proc.stderr

    def test_native_sidecar_needs_kubernetes_1_29(self, helm: str) -> None:
        """guard.nativeSidecar on a cluster older than 1.29 fails; on 1.29 it renders."""
        native = CHART / "ci" / "native-sidecar-values.yaml"
        old = helm_template(helm, values=[native], kube_version="1.28.0", check=False)
        assert old.returncode != 0
        assert "needs Kubernetes >= 1.29" in old.stderr
        assert helm_template(helm, values=[native], kube_version="1.29.0", check=False).returncode == 0
