"""The chart's access-control, TLS and SIEM values: credentials reach the guard as read-only Secret mounts, the
settings they imply are in config.yaml and load in the real settings and sink parsers, the spool is writable, and
combinations that cannot work fail at render time."""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from guard_agent.auth import JwtVerifier, KeyStore
from guard_agent.settings import load_settings
from guard_agent.sinks import HttpSinkConfig, SyslogSinkConfig, parse_sinks
from guard_agent.sinks import _config as sink_config
from guard_agent.tls import TlsReloader
from tests._support.sinks import make_certs
from tests.chart._tools import CHART, CI_VALUES, REPO, by_kind, container, helm_template, parse_docs, pod_spec

Render = Callable[..., list[dict[str, Any]]]
VALUES = CHART / "ci" / "access-tls-sinks-values.yaml"
STANDALONE = CHART / "ci" / "standalone-values.yaml"
ETC = "/etc/inference-guard/"
SPOOL = "/var/spool/inference-guard"
# mount path -> (volume name, Secret or ConfigMap name) in the CI values file
CREDENTIAL_MOUNTS = {
    ETC + "api-keys": ("guard-api-keys", "guard-api-keys"),
    ETC + "jwks": ("guard-jwks", "guard-jwks"),
    ETC + "tls": ("guard-tls", "guard-tls"),
    ETC + "tls-client-ca": ("guard-tls-client-ca", "guard-client-ca"),
    ETC + "sinks/siem-ca": ("guard-sink-0", "siem-ca"),
    ETC + "sinks/splunk-hec": ("guard-sink-1", "splunk-hec"),
}


def guard_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(pod_spec(docs), "guard")["env"]}


def mounts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(pod_spec(docs), "guard")["volumeMounts"]}


def volumes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(docs)["volumes"]}


def config_text(docs: list[dict[str, Any]]) -> str:
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    text: str = cm["data"]["config.yaml"]
    return text


def config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(config_text(docs))
    return loaded


class TestRendered:
    def test_ci_file_is_a_linted_variant(self) -> None:
        """The values file is one of ci/*-values.yaml, so test_render lints (--strict) and validates it."""
        assert VALUES in CI_VALUES

    def test_api_keys_file_env(self, render: Render) -> None:
        """GUARD_API_KEYS_FILE names the configured key inside the API-key Secret's mount."""
        assert guard_env(render(VALUES))["GUARD_API_KEYS_FILE"] == ETC + "api-keys/keys.yaml"

    def test_credentials_are_read_only_directory_mounts(self, render: Render) -> None:
        """API keys, JWKS, TLS, client CA and sink Secrets are mounted read-only, whole (no subPath), mode 0440."""
        docs = render(VALUES)
        m, v = mounts(docs), volumes(docs)
        for path, (volume, source) in CREDENTIAL_MOUNTS.items():
            assert m[path]["name"] == volume
            assert m[path]["readOnly"] is True
            assert "subPath" not in m[path]
            assert v[volume]["secret"]["secretName"] == source
            assert v[volume]["secret"]["defaultMode"] == 0o440

    def test_spool_is_the_writable_empty_dir(self, render: Render) -> None:
        """The spool is mounted writable at /var/spool/inference-guard from an emptyDir with the size limit."""
        docs = render(VALUES)
        assert not mounts(docs)[SPOOL].get("readOnly")
        assert volumes(docs)["guard-spool"] == {"name": "guard-spool", "emptyDir": {"sizeLimit": "512Mi"}}

    def test_config_keys(self, render: Render) -> None:
        """config.yaml carries jwt_*, tls_*, spool_dir and the sinks list exactly as given in values."""
        cfg = config(render(VALUES))
        given = yaml.safe_load(VALUES.read_text())
        assert cfg["jwt_jwks_file"] == ETC + "jwks/jwks.json"
        assert (cfg["jwt_issuer"], cfg["jwt_audience"], cfg["jwt_session_claim"]) == (
            "https://auth.example.org/", "inference-guard", "client_id")
        assert cfg["tls_cert_file"] == ETC + "tls/tls.crt"
        assert cfg["tls_key_file"] == ETC + "tls/tls.key"
        assert cfg["tls_client_ca_file"] == ETC + "tls-client-ca/ca.crt"
        assert cfg["spool_dir"] == SPOOL
        assert cfg["sinks"] == given["siem"]["sinks"]

    def test_probes_stay_plain_http_on_the_admin_port(self, render: Render) -> None:
        """With TLS on the guard port, every probe still targets the admin port over plain HTTP."""
        guard = container(pod_spec(render(VALUES)), "guard")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = guard[probe]["httpGet"]
            assert get["port"] == "guard-admin"
            assert get.get("scheme", "HTTP") == "HTTP"

    def test_rendered_config_loads(self, render: Render, tmp_path: Path) -> None:
        """config.yaml plus the guard's env load in load_settings, and the sinks parse against the mounted files."""
        docs = render(VALUES)
        root = tmp_path / "root"
        text = config_text(docs).replace(ETC, f"{root}/etc/inference-guard/").replace(SPOOL, f"{root}/spool")
        for rel in ("sinks/siem-ca/ca.pem", "sinks/splunk-hec/token", "api-keys/keys.yaml"):
            path = root / "etc" / "inference-guard" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("placeholder-token\n")
        (tmp_path / "config.yaml").write_text(text)
        env = {k: v.replace(ETC, f"{root}/etc/inference-guard/") for k, v in guard_env(docs).items()
               if k == "GUARD_API_KEYS_FILE"}
        s = load_settings(tmp_path / "config.yaml", env=env)
        assert s.api_keys_file == f"{root}/etc/inference-guard/api-keys/keys.yaml"
        assert s.jwt_session_claim == "client_id"
        assert s.tls_client_ca_file is not None and s.tls_client_ca_file.endswith("/tls-client-ca/ca.crt")
        syslog, http = parse_sinks(s.sinks, s.spool_dir)
        assert isinstance(syslog, SyslogSinkConfig) and isinstance(http, HttpSinkConfig)
        assert syslog.spool_dir == f"{root}/spool/rsyslog"
        assert http.read_token() == "placeholder-token"

    def test_rendered_paths_work_with_the_real_credential_loaders(self, render: Render, tmp_path: Path) -> None:
        """Real files at the rendered paths load in KeyStore, JwtVerifier (verifying a token) and TlsReloader."""
        docs = render(VALUES)
        root = tmp_path / "root"
        (tmp_path / "config.yaml").write_text(config_text(docs).replace(ETC, f"{root}{ETC}")
                                              .replace(SPOOL, f"{root}/spool"))
        env = {"GUARD_API_KEYS_FILE": guard_env(docs)["GUARD_API_KEYS_FILE"].replace(ETC, f"{root}{ETC}")}
        for sub in ("api-keys", "jwks", "tls", "tls-client-ca"):
            (root / ETC.strip("/") / sub).mkdir(parents=True)
        s = load_settings(tmp_path / "config.yaml", env=env)
        assert s.api_keys_file and s.jwt_jwks_file and s.tls_cert_file and s.tls_key_file and s.tls_client_ca_file

        key = "k" * 8 + secrets.token_hex(16)
        Path(s.api_keys_file).write_text(yaml.safe_dump({"keys": [{"name": "team-a", "key": key}]}))
        found = KeyStore(s.api_keys_file).lookup(key)
        assert found is not None and found.name == "team-a"

        signer = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signer.public_key()))
        Path(s.jwt_jwks_file).write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
        token = jwt.encode({"iss": s.jwt_issuer, "aud": s.jwt_audience, "client_id": "svc-7",
                            "exp": int(time.time()) + 60}, signer, algorithm="ES256", headers={"kid": "k1"})
        verifier = JwtVerifier(s.jwt_jwks_file, issuer=s.jwt_issuer, audience=s.jwt_audience,
                               session_claim=s.jwt_session_claim)
        assert verifier.verify(token).subject == "svc-7"

        certs = make_certs(tmp_path)
        shutil.copy(certs.cert, s.tls_cert_file)
        shutil.copy(certs.key, s.tls_key_file)
        shutil.copy(certs.ca, s.tls_client_ca_file)
        ctx = TlsReloader(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file).current
        assert ctx.verify_mode == ssl.CERT_REQUIRED

    def test_jwks_from_a_config_map_and_spool_on_a_pvc(self, render: Render) -> None:
        """A JWKS ConfigMap and a PVC spool render as those volume kinds."""
        docs = render(VALUES, sets=("guard.access.jwt.jwksSecret=", "guard.access.jwt.jwksConfigMap=public-jwks",
                                    "siem.spool.type=pvc", "siem.spool.claimName=guard-spool"))
        v = volumes(docs)
        assert v["guard-jwks"]["configMap"]["name"] == "public-jwks"
        assert v["guard-spool"]["persistentVolumeClaim"]["claimName"] == "guard-spool"
        assert mounts(docs)[ETC + "jwks"]["readOnly"] is True

    def test_off_by_default(self, render: Render) -> None:
        """Without these values nothing is mounted, no env is set and config.yaml has none of the keys."""
        docs = render(STANDALONE)
        assert "GUARD_API_KEYS_FILE" not in guard_env(docs)
        assert not set(mounts(docs)) & {*CREDENTIAL_MOUNTS, SPOOL}
        assert not {n for n in volumes(docs) if n.startswith(("guard-api", "guard-jwks", "guard-tls", "guard-sink",
                                                               "guard-spool"))}
        assert not {k for k in config(docs) if k.startswith(("jwt_", "tls_", "sinks", "spool_", "api_keys"))}


class TestSinkSchema:
    def test_schema_knows_every_sink_key(self) -> None:
        """The closed sink schema lists exactly the keys the guard's sink parser reads, so neither side drifts."""
        schema = json.loads((CHART / "values.schema.json").read_text())
        item = schema["properties"]["siem"]["properties"]["sinks"]["items"]
        assert set(item["properties"]) == sink_config._SYSLOG_KEYS | sink_config._HTTP_KEYS

    def test_documented_example_sinks_render(self, helm: str, tmp_path: Path) -> None:
        """The sinks of examples/sinks/guard-sinks.yaml pass the schema and land unchanged in config.yaml."""
        example = yaml.safe_load((REPO / "examples" / "sinks" / "guard-sinks.yaml").read_text())
        values = tmp_path / "values.yaml"
        values.write_text(yaml.safe_dump({"siem": {"sinks": example["sinks"], "spool": {"type": "emptyDir"},
                                                   "secrets": ["splunk-hec"]}}))
        proc = helm_template(helm, values=(STANDALONE, values))
        assert config(parse_docs(proc.stdout))["sinks"] == example["sinks"]


class TestRefused:
    @pytest.mark.parametrize(("sets", "expected"), [
        (("siem.spool.type=pvc",), "siem.spool.type=pvc needs siem.spool.claimName"),
        (("siem.spool.type=none",), "siem.sinks need a spool"),
        (("guard.access.jwt.jwksConfigMap=public-jwks",), "set jwksSecret or jwksConfigMap, not both"),
        (("guard.tls.existingSecret=",), "guard.tls.clientCASecret (mTLS) needs guard.tls.existingSecret"),
        (("guard.env[0].name=GUARD_API_KEYS_FILE", "guard.env[0].value=/x"), "use guard.access.apiKeys"),
        (("guard.access.apiKeys.existingSecrett=x",), "existingSecrett is not allowed"),
        (("siem.spool.type=hostPath",), "siem.spool.type"),
        (("siem.sinks[1].token=inline-secret",), "token is not allowed"),
    ], ids=["pvc-without-claim", "sinks-without-spool", "two-jwks-sources", "mtls-without-tls", "env-override",
            "unknown-key", "bad-spool-type", "inline-token"])
    def test_fails_with_a_clear_message(self, helm: str, sets: tuple[str, ...], expected: str) -> None:
        """Each impossible combination stops helm template with a message naming the values to fix."""
        proc = helm_template(helm, values=(VALUES,), sets=sets, check=False)
        assert proc.returncode != 0
        assert expected.lower() in proc.stderr.lower(), proc.stderr
