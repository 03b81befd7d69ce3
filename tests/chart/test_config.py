"""The chart's config, policy and secret wiring is what the guard itself accepts.

Render, extract, load: the rendered config.yaml goes through guard_agent.settings.load_settings with
the environment the chart gives the guard container (secret paths remapped to files holding the
rendered Secret's values), the rendered policy through `guard-agent check`, and one test runs the
real guard on the rendered files laid out as the kubelet mounts them, then swaps the policy.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from guard_agent.cli import main as cli_main
from guard_agent.settings import ConfigError, Settings, load_settings
from tests.chart._tools import CHART, CI_VALUES, REPO, by_kind, container, find_tool, one, pod_spec, run

Render = Callable[..., list[dict[str, Any]]]
WORKLOAD_VARIANTS = [p for p in CI_VALUES if p.name != "injection-values.yaml"]
SECRETS_DIR = "/etc/inference-guard/secrets/"
CHART_OWNED = {"listen", "admin_listen", "upstream", "policy", "profile"}
SECRET_SETTINGS = {"hmac_key", "admin_token", "redis_url"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix("-values.yaml") for p in paths]


def _data(docs: list[dict[str, Any]], suffix: str, key: str) -> str:
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith(suffix))
    return str(cm["data"][key])


def _materialise(docs: list[dict[str, Any]], tmp: Path) -> tuple[Path, dict[str, str]]:
    """Write config.yaml and the secret files; return the config path and the guard's environment."""
    config = tmp / "config.yaml"
    config.write_text(_data(docs, "-config", "config.yaml"))
    secrets = tmp / "secrets"
    secrets.mkdir()
    rendered = by_kind(docs, "Secret")
    values = ({k: base64.b64decode(v).decode() for k, v in rendered[0]["data"].items()} if rendered else {})
    env: dict[str, str] = {}
    for item in container(pod_spec(docs), "guard")["env"]:
        value = item["value"]
        if value.startswith(SECRETS_DIR):
            key = value.removeprefix(SECRETS_DIR)
            # an existing Secret is not rendered: stand in for its keys
            (secrets / key).write_text(values.get(key, "redis://:pw@127.0.0.1:6379/0" if "redis" in key
                                                   else "stand-in-" + key))
            value = str(secrets / key)
        env[item["name"]] = value
    return config, env


class TestPolicyFile:
    def test_shipped_policy_is_the_projects_default(self) -> None:
        """files/policy.yaml is byte-identical to examples/policy.yaml."""
        example = REPO / "examples" / "policy.yaml"
        if not example.exists():
            pytest.skip("examples/policy.yaml does not exist yet")
        assert (CHART / "files" / "policy.yaml").read_bytes() == example.read_bytes(), (
            "refresh the chart's copy: cp examples/policy.yaml helm/inference-guard/files/policy.yaml"
        )

    def test_rendered_policies_pass_guard_agent_check(self, render: Render, tmp_path: Path) -> None:
        """Every variant's rendered policy.yaml is accepted by the real `guard-agent check` CLI (exit 0)."""
        guard_agent = find_tool("guard-agent")
        assert guard_agent is not None, "guard-agent is not installed in this environment"
        paths = []
        for values in WORKLOAD_VARIANTS:
            docs = render(values)
            if any(d["metadata"]["name"].endswith("-policy") for d in by_kind(docs, "ConfigMap")):
                path = tmp_path / values.name.replace("-values", "-policy")
                path.write_text(_data(docs, "-policy", "policy.yaml"))
                paths.append(str(path))
        assert len(paths) >= 4
        proc = run([guard_agent, "check", *paths], check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("ok:") == len(paths)

    def test_guard_agent_check_rejects_a_broken_policy(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Control: the check command exits 1 on a policy with an unknown action."""
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nmode: enforce\nrules:\n  - id: r\n    when: {ood.knn: {gt: 0.9}}\n"
                          "    action: explode\n")
        assert cli_main(["check", str(policy)]) == 1
        assert "action" in capsys.readouterr().err


class TestProcessConfig:
    @pytest.mark.parametrize("values", WORKLOAD_VARIANTS, ids=_ids(WORKLOAD_VARIANTS))
    def test_loader_accepts_the_rendered_config(self, render: Render, tmp_path: Path, values: Path) -> None:
        """load_settings accepts config.yaml plus the container's env; secrets arrive only via *_FILE."""
        docs = render(values, kube_version="1.29.0")
        config, env = _materialise(docs, tmp_path)
        settings = load_settings(config, env=env)
        assert settings.upstream.startswith("http://127.0.0.1:")
        assert settings.hmac_key
        assert settings.policy == "/etc/inference-guard/policy"
        raw = yaml.safe_load(config.read_text())
        assert not SECRET_SETTINGS & raw.keys()

    def test_redis_variant_yields_a_redis_url_from_the_secret(self, render: Render, tmp_path: Path) -> None:
        """With redis enabled the URL reaches the settings from the Secret file, beside the HMAC key."""
        config, env = _materialise(render(CHART / "ci" / "redis-values.yaml"), tmp_path)
        settings = load_settings(config, env=env)
        assert settings.redis_url == "redis://:change-me@redis-master.sessions.svc:6379/0"
        assert settings.profile == "/etc/inference-guard/profile/clf"

    def test_values_config_reaches_the_settings(self, render: Render, tmp_path: Path) -> None:
        """guard.config keys land in Settings with their types (tuples, floats, ints)."""
        docs = render(CHART / "ci" / "standalone-values.yaml")
        config, env = _materialise(docs, tmp_path)
        settings = load_settings(config, env=env)
        assert settings.trusted_proxies == ("10.0.0.0/8",)
        assert settings.log_sample_allow == pytest.approx(0.1)
        assert settings.session_sources == ("header", "bearer", "address")

    def test_loader_rejects_what_the_chart_must_not_render(self, tmp_path: Path) -> None:
        """Control: the loader refuses an unknown key, so acceptance above is meaningful."""
        config = tmp_path / "config.yaml"
        config.write_text("listen: 0.0.0.0:8080\nlistne: 1\n")
        with pytest.raises(ConfigError):
            load_settings(config, env={})

    def test_schema_config_keys_are_settings_fields(self) -> None:
        """Every key the schema allows under guard.config is a Settings field the chart does not own."""
        schema = json.loads((CHART / "values.schema.json").read_text())
        allowed = set(schema["properties"]["guard"]["properties"]["config"]["properties"])
        fields = {f.name for f in dataclasses.fields(Settings)}
        assert allowed <= fields - CHART_OWNED - SECRET_SETTINGS
        assert fields >= CHART_OWNED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kubelet_configmap(directory: Path, files: dict[str, str], generation: int) -> None:
    """Write files the way the kubelet updates a ConfigMap volume: new dir, atomic ..data swap."""
    target = directory / f"..2026_01_01_00_00_0{generation}.000000000"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(target.name)
    tmp_link.rename(directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def guard(render: Render, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real guard-agent (shared by TestRealGuard, reload test last) on the rendered files."""
    tmp_path = tmp_path_factory.mktemp("guard")
    guard_agent = find_tool("guard-agent")
    assert guard_agent is not None
    docs = render(CHART / "ci" / "standalone-values.yaml", sets=("profile.source=none",))
    config, env = _materialise(docs, tmp_path)
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    policy_text = _data(docs, "-policy", "policy.yaml")
    _kubelet_configmap(policy_dir, {"policy.yaml": policy_text}, 1)
    admin = _free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")} | env
    log = tmp_path / "guard.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [guard_agent, "run", "--config", str(config), "--policy", str(policy_dir),
         "--listen", f"127.0.0.1:{_free_port()}", "--admin-listen", f"127.0.0.1:{admin}"],
        env=full_env, stdout=log_file, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{admin}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _get(base + "/livez")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"guard exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
    token = base64.b64decode(one(docs, "Secret")["data"]["admin-token"]).decode()
    try:
        yield {"base": base, "token": token, "policy_dir": policy_dir, "policy": policy_text, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()

@pytest.mark.slow
class TestRealGuard:
    def test_admin_token_from_the_secret_opens_the_admin_api(self, guard: dict[str, Any]) -> None:
        """The token the chart's Secret holds unlocks /admin/*; no token gets 401."""
        assert _get(guard["base"] + "/admin/policy")[0] == 401
        status, body = _get(guard["base"] + "/admin/policy", guard["token"])
        assert status == 200
        assert body["mode"] == "enforce"

    def test_hmac_key_file_is_used(self, guard: dict[str, Any]) -> None:
        """The guard finds its HMAC key through GUARD_HMAC_KEY_FILE: no random-key warning is logged."""
        lines = [json.loads(line) for line in guard["log"].read_text().splitlines() if line.startswith("{")]
        assert lines, "the guard logged nothing on stdout"
        assert not [ln for ln in lines if "GUARD_HMAC_KEY" in ln.get("message", "")]

    def test_configmap_swap_reloads_the_policy_without_restart(self, guard: dict[str, Any]) -> None:
        """A kubelet-style ..data swap of the policy directory is picked up by the running guard."""
        _, before = _get(guard["base"] + "/admin/policy", guard["token"])
        new_policy = guard["policy"].replace("\nmode: enforce\n", "\nmode: monitor\n", 1)
        assert new_policy != guard["policy"]
        _kubelet_configmap(guard["policy_dir"], {"policy.yaml": new_policy}, 2)
        deadline = time.monotonic() + 15
        after = before
        while time.monotonic() < deadline:
            _, after = _get(guard["base"] + "/admin/policy", guard["token"])
            if after["revision"] != before["revision"]:
                break
            time.sleep(0.25)
        assert after["revision"] != before["revision"]
        assert after["mode"] == "monitor"
