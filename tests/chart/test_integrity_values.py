"""The chart's model-integrity values: canaries, public key and the model volume reach the guard read-only,
the rendered wiring is what the guard accepts (real checker on the rendered layout), and bad combinations
fail at render time."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard_agent.app import build_state
from guard_agent.events import CallbackSink
from guard_agent.integrity import CanarySet, IntegrityChecker, save_canaries, sign_directory
from guard_agent.settings import load_settings
from tests.chart._tools import CHART, by_kind, container, helm_template, parse_docs, pod_spec, run

Render = Callable[..., list[dict[str, Any]]]
VALUES = CHART / "ci" / "integrity-values.yaml"
ETC = "/etc/inference-guard/"


def guard_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(pod_spec(docs), "guard")["env"]}


def mounts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(pod_spec(docs), "guard")["volumeMounts"]}


class TestRendered:
    def test_env_names_and_paths(self, render: Render) -> None:
        """GUARD_CANARIES, GUARD_CANARY_INTERVAL, GUARD_MODEL_DIR and the key file point into the mounts."""
        env = guard_env(render(VALUES))
        assert env["GUARD_CANARIES"] == "/etc/inference-guard/canaries"
        assert env["GUARD_CANARY_INTERVAL"] == "120"
        assert env["GUARD_MODEL_DIR"] == "/etc/inference-guard/model/digits"
        assert env["GUARD_MODEL_PUBLIC_KEY_FILE"] == "/etc/inference-guard/model-key/model-signing.pub"

    def test_everything_mounted_read_only(self, render: Render) -> None:
        """The canaries, the key and the model's own volume are mounted read-only into the guard."""
        docs = render(VALUES)
        m = mounts(docs)
        for path, volume in (("/etc/inference-guard/canaries", "guard-canaries"),
                             ("/etc/inference-guard/model-key", "guard-model-key"),
                             ("/etc/inference-guard/model", "models")):
            assert m[path]["name"] == volume
            assert m[path]["readOnly"] is True
        volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
        assert volumes["guard-canaries"]["configMap"]["name"] == "digits-canaries"
        assert {i["path"] for i in volumes["guard-canaries"]["configMap"]["items"]} >= {"v1/canaries.json",
                                                                                         "v2/canaries.npz"}
        assert [v["name"] for v in pod_spec(docs)["volumes"]].count("models") == 1

    def test_public_key_config_map(self, render: Render) -> None:
        """The public key is rendered into its own ConfigMap, as PEM, under the configured key."""
        docs = render(VALUES)
        cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-integrity"))
        pem = cm["data"]["model-signing.pub"]
        assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
        assert serialization.load_pem_public_key(pem.encode())

    @pytest.mark.parametrize(("source", "sets", "volume_key", "path"), [
        ("secret", ("integrity.canaries.secret.name=digits-canaries",), "secret", "/etc/inference-guard/canaries"),
        ("pvc", ("integrity.canaries.pvc.claimName=guard-canaries", "integrity.canaries.pvc.path=digits/"),
         "persistentVolumeClaim", "/etc/inference-guard/canaries/digits"),
    ])
    def test_other_canary_sources(self, render: Render, source: str, sets: tuple[str, ...], volume_key: str,
                                  path: str) -> None:
        """A Secret or a PVC (with a directory inside) can hold the canary sets too."""
        docs = render(CHART / "ci" / "standalone-values.yaml",
                      sets=(f"integrity.canaries.source={source}", *sets))
        volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
        assert volume_key in volumes["guard-canaries"]
        assert guard_env(docs)["GUARD_CANARIES"] == path
        assert "GUARD_MODEL_DIR" not in guard_env(docs)

    def test_off_by_default(self, standalone: list[dict[str, Any]]) -> None:
        """Without integrity values nothing is mounted, set or rendered for it."""
        assert not {"GUARD_CANARIES", "GUARD_MODEL_DIR"} & guard_env(standalone).keys()
        assert not any(p.startswith((ETC + "canaries", ETC + "model")) for p in mounts(standalone))
        assert not any(d["metadata"]["name"].endswith("-integrity") for d in by_kind(standalone, "ConfigMap"))


class TestGuardAcceptsTheWiring:
    def test_real_checker_on_the_rendered_layout(self, helm: str, tmp_path: Path) -> None:
        """The rendered env and config, with /etc/inference-guard remapped to a directory laid out as the
        kubelet mounts it, start a real integrity checker that verifies the signed model and loads both sets."""
        key = Ed25519PrivateKey.generate()
        pem_file = tmp_path / "pub.pem"
        pem_file.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
        docs = parse_docs(run([helm, "template", "demo", str(CHART), "--namespace", "models", "-f", str(VALUES),
                               "--set-file", f"integrity.signing.publicKey={pem_file}"]).stdout)
        root = tmp_path / "etc"
        cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-integrity"))
        (root / "model-key").mkdir(parents=True)
        (root / "model-key" / "model-signing.pub").write_text(cm["data"]["model-signing.pub"])
        model = root / "model" / "digits"
        model.mkdir(parents=True)
        (model / "model.joblib").write_bytes(b"approved weights")
        sign_directory(model, key)
        probs = np.array([[0.7, 0.3], [0.1, 0.9]])
        for version in ("v1", "v2"):
            save_canaries(CanarySet(model="digits", inputs=np.eye(2), labels=np.array([0, 1]), probabilities=probs,
                                    kinds=("sample", "sample")), root / "canaries" / version)
        env = {k: v.replace(ETC, str(root) + "/") for k, v in guard_env(docs).items() if not v.startswith(ETC + "s")}
        config = tmp_path / "config.yaml"
        config.write_text(next(d for d in by_kind(docs, "ConfigMap")
                               if d["metadata"]["name"].endswith("-config"))["data"]["config.yaml"])
        settings = load_settings(config, env={**env, "GUARD_HMAC_KEY": "k"})
        assert settings.canary_interval == 120.0
        settings = dataclasses.replace(settings, policy=None)  # the policy mount is another test's subject

        lines: list[bytes] = []
        state = build_state(settings, sink=CallbackSink(lines.append))
        checker = state.integrity
        assert isinstance(checker, IntegrityChecker)
        assert len(checker.revisions["digits"]) == 2
        report = asyncio.run(checker.verify_signature("start"))
        assert report.ok, report.problems
        assert checker.score("digits") == 0.0
        shutil.rmtree(model)
        model.mkdir()
        (model / "model.joblib").write_bytes(b"other weights")
        assert not asyncio.run(checker.verify_signature("change")).ok
        assert checker.score("digits") == 1.0


class TestRefused:
    @pytest.mark.parametrize(("sets", "message"), [
        (("integrity.canaries.source=secret",), "integrity.canaries.secret.name"),
        (("integrity.canaries.source=configMap", "integrity.canaries.configMap.name="),
         "integrity.canaries.configMap.name"),
        (("integrity.canaries.source=pvc",), "integrity.canaries.pvc.claimName"),
        (("integrity.signing.modelVolume=",), "modelVolume"),
        (("integrity.signing.modelVolume=weights",), '"weights" is not among model.volumes'),
        (("integrity.signing.publicKey=",), "publicKey (PEM text) or"),
        (("integrity.signing.existingConfigMap=keys",), "not both"),
        (("integrity.signing.publicKey=-----BEGIN PRIVATE KEY-----",), "never the private key"),
        (("integrity.signing.enabled=false",), "integrity.signing.enabled is false"),
        (("guard.config.canary_interval=5",), "guard.config.canary_interval"),
        (("guard.env[0].name=GUARD_MODEL_DIR", "guard.env[0].value=/x"), "guard.env sets GUARD_MODEL_DIR"),
        (("integrity.canaries.interval=0",), "interval"),
        (("integrity.canaries.sorce=pvc",), "sorce"),
    ])
    def test_bad_combination_fails_with_a_reason(self, helm: str, sets: tuple[str, ...], message: str) -> None:
        """helm template refuses the values and says which key to fix."""
        proc = helm_template(helm, values=[VALUES], sets=sets, check=False)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr
