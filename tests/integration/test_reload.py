"""Policy hot reload: a real ConfigMap-style ..data symlink swap, broken files, SIGHUP, /admin/reload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests._support.waiting import wait_for
from tests.conftest import ModelServer, free_port, wait_http

pytestmark = pytest.mark.slow

POLICY_A = "version: 1\nmode: enforce\n"
POLICY_B = "version: 1\nmode: monitor\n"
BROKEN = "version: 1\nmode: enforce\nrules:\n  - id: x\n    action: explode\n    when: {request.rows: {gt: 1}}\n"


def configmap_dir(root: Path, text: str) -> Path:
    """Lay out a directory the way the kubelet mounts a ConfigMap: policy.yaml -> ..data/policy.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    version = root / f"..{time.monotonic_ns()}"
    version.mkdir()
    (version / "policy.yaml").write_text(text)
    os.symlink(version.name, root / "..data")
    os.symlink("..data/policy.yaml", root / "policy.yaml")
    return root


def swap_configmap(root: Path, text: str) -> None:
    """The kubelet's atomic update: write a new version dir, then rename a new ..data symlink over the old."""
    version = root / f"..{time.monotonic_ns()}"
    version.mkdir()
    (version / "policy.yaml").write_text(text)
    tmp_link = root / "..data_tmp"
    os.symlink(version.name, tmp_link)
    os.replace(tmp_link, root / "..data")


class TestWatchedDirectory:
    async def test_configmap_symlink_swap_reloads(self, tmp_path: Path, mlserver: ModelServer, start_guard) -> None:
        """Swapping ..data (as Kubernetes does) activates the new policy within the watch interval."""
        cm = configmap_dir(tmp_path / "cm", POLICY_A)
        guard = await start_guard(mlserver.url, policy=str(cm))
        first = guard.state.policies.current.revision
        swap_configmap(cm, POLICY_B)
        assert await wait_for(lambda: guard.state.policies.current.default.mode == "monitor")
        assert guard.state.policies.current.revision != first
        assert any(e["message"] == "policy reloaded" for e in guard.events)

    async def test_broken_policy_keeps_last_good(self, tmp_path: Path, mlserver: ModelServer, start_guard) -> None:
        """A broken update is rejected with file/line/field, counted, and the last good policy stays."""
        cm = configmap_dir(tmp_path / "cm", POLICY_A)
        guard = await start_guard(mlserver.url, policy=str(cm))
        good = guard.state.policies.current.revision
        swap_configmap(cm, BROKEN)
        assert await wait_for(lambda: any(e["message"].startswith("policy rejected") for e in guard.events))
        assert guard.state.policies.current.revision == good
        err = next(e for e in guard.events if e["message"].startswith("policy rejected"))
        assert ":5: rules[0].action" in err["error"]["message"]
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_policy_reloads_total", {"result": "failed"}) >= 1
        async with aiohttp.ClientSession() as http, http.get(guard.admin_url + "/readyz") as r:
            assert r.status == 200

    async def test_deleted_and_dangling_policy_keep_last_good(self, tmp_path: Path, mlserver: ModelServer,
                                                              start_guard) -> None:
        """A dangling symlink or a deleted file never replaces the active policy."""
        cm = configmap_dir(tmp_path / "cm", POLICY_A)
        guard = await start_guard(mlserver.url, policy=str(cm))
        good = guard.state.policies.current.revision
        os.replace(cm / "policy.yaml", cm / "gone")
        os.symlink("..data/nowhere.yaml", cm / "policy.yaml")
        assert await wait_for(lambda: any(e["message"].startswith("policy rejected") for e in guard.events))
        assert guard.state.policies.current.revision == good


class TestAdminReload:
    async def test_admin_reload_422_then_200(self, tmp_path: Path, mlserver: ModelServer, start_guard) -> None:
        """POST /admin/reload answers 422 with the error for a bad policy, 200 for a good one."""
        path = tmp_path / "policy.yaml"
        path.write_text(POLICY_A)
        guard = await start_guard(mlserver.url, policy=str(path), reload_interval=3600)
        auth = {"Authorization": "Bearer test-admin-token"}
        async with aiohttp.ClientSession() as http:
            path.write_text(BROKEN)
            async with http.post(guard.admin_url + "/admin/reload", headers=auth) as r:
                assert r.status == 422
                assert "rules[0].action" in (await r.json())["error"]["message"]
            assert guard.state.policies.current.default.mode == "enforce"
            path.write_text(POLICY_B)
            async with http.post(guard.admin_url + "/admin/reload", headers=auth) as r:
                assert r.status == 200
            async with http.get(guard.admin_url + "/admin/policy", headers=auth) as r:
                assert (await r.json())["mode"] == "monitor"
            async with http.post(guard.admin_url + "/admin/reload") as r:
                assert r.status == 401
            async with http.get(guard.admin_url + "/metrics") as r:
                text = await r.text()
        assert 'inference_guard_policy_reloads_total{result="failed"} 1.0' in text


class TestSighup:
    def test_sighup_reloads_a_real_process(self, tmp_path: Path, mlserver: ModelServer) -> None:
        """`guard-agent run` reloads on SIGHUP and exits 0 on SIGTERM."""
        path = tmp_path / "policy.yaml"
        path.write_text(POLICY_A)
        port, admin = free_port(), free_port()
        env = {**os.environ, "GUARD_LISTEN": f"127.0.0.1:{port}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{admin}",
               "GUARD_UPSTREAM": mlserver.url, "GUARD_POLICY": str(path), "GUARD_RELOAD_INTERVAL": "3600",
               "GUARD_ADMIN_TOKEN": "t0k"}
        proc = subprocess.Popen([sys.executable, "-m", "guard_agent.cli", "run"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=30, proc=proc)
            path.write_text(POLICY_B)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            mode = None
            while time.monotonic() < deadline:
                req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/policy",
                                             headers={"Authorization": "Bearer t0k"})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    mode = orjson.loads(resp.read())["mode"]
                if mode == "monitor":
                    break
                time.sleep(0.1)
            assert mode == "monitor"
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
        messages = [orjson.loads(line)["message"] for line in out.splitlines() if line.startswith(b"{")]
        assert "policy reloaded" in messages
        assert messages[-1] == "guard stopped"
