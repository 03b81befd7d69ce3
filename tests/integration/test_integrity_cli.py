"""The real ``guard-agent canary`` and ``guard-agent sign`` commands, run as subprocesses, and canary set hot
reload in a running guard (validate, swap, keep the last good set)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from guard_agent.cli import main as cli_main
from guard_agent.integrity import load_canaries
from tests._support.waiting import wait_for
from tests.conftest import DigitsData, GuardFactory, ModelServer

pytestmark = pytest.mark.slow

GUARD_AGENT = str(Path(sys.executable).parent / "guard-agent")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, as an operator runs it."""
    return subprocess.run([GUARD_AGENT, *args], capture_output=True, text=True, timeout=120)


def cli_inline(*args: str) -> subprocess.CompletedProcess[str]:
    """The same entry point in this process (the box is small: interpreter start-ups add up)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def record(mlserver: ModelServer, ref: Path, out: Path, *extra: str,
           run: Callable[..., subprocess.CompletedProcess[str]] = cli_inline) -> subprocess.CompletedProcess[str]:
    return run("canary", "record", "--upstream", mlserver.url, "--model", "digits", "--data", str(ref),
               "--out", str(out), *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, digits: DigitsData) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.csv"
    header = ",".join(f"px{i}" for i in range(64)) + ",label"
    rows = np.column_stack([digits.X_test, digits.y_test])
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%g")
    return path


class TestCanaryCommand:
    def test_record_then_check(self, tmp_path: Path, mlserver: ModelServer, reference: Path) -> None:
        """record writes a loadable set (prototypes, boundary rows, samples, metadata) from CSV with a label
        column; check against the same model exits 0; recording over it without --force exits 2."""
        out = tmp_path / "canaries"
        proc = record(mlserver, reference, out, "--label-column", "label", "--count", "30", run=cli)
        assert proc.returncode == 0, proc.stderr
        assert "10 class prototypes" in proc.stdout
        cs = load_canaries(out)
        assert cs.count == 30
        assert cs.inputs.shape == (30, 64)
        assert set(cs.kinds) == {"prototype", "boundary", "sample"}
        assert cs.probabilities is not None
        assert cs.probabilities.shape == (30, 10)
        assert cs.metadata is not None
        assert cs.metadata["name"] == "digits"
        assert cs.revision in proc.stdout
        check = cli_inline("canary", "check", "--upstream", mlserver.url, "--canaries", str(out))
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.startswith("ok   digits")
        as_json = cli_inline("canary", "check", "--upstream", mlserver.url, "--canaries", str(out), "--json")
        (result,) = json.loads(as_json.stdout)
        assert as_json.returncode == 0 and result["ok"] is True and result["model"] == "digits"
        assert result["revision"] == cs.revision and result["checked"] > 0 and result["metadata_changed"] == []
        again = record(mlserver, reference, out, "--label-column", "label")
        assert again.returncode == 2
        assert "--force" in again.stderr

    def test_unreachable_model_is_an_error_not_a_set(self, tmp_path: Path, reference: Path) -> None:
        """Recording against a closed port fails with exit 2 and writes nothing."""
        from tests.conftest import free_port

        out = tmp_path / "canaries"
        proc = cli_inline("canary", "record", "--upstream", f"http://127.0.0.1:{free_port()}", "--model", "digits",
                   "--data", str(reference), "--label-column", "label", "--out", str(out))
        assert proc.returncode == 2
        assert "Cannot connect" in proc.stderr or "Connect" in proc.stderr
        assert not (out / "canaries.json").exists()


class TestSignCommand:
    def test_generate_sign_verify_and_tamper(self, tmp_path: Path, mlserver: ModelServer) -> None:
        """A generated key pair signs a model directory; verify exits 0, then 1 naming a modified file; the
        private key is written 0600 and never overwritten."""
        key = tmp_path / "keys" / "model-signing.pem"
        key.parent.mkdir()
        gen = cli("sign", "--generate-key", "--key", str(key))
        assert gen.returncode == 0, gen.stderr
        assert key.stat().st_mode & 0o777 == 0o600
        assert cli_inline("sign", "--generate-key", "--key", str(key)).returncode == 2
        model = tmp_path / "model"
        shutil.copytree(mlserver.root / "digits", model)
        signed = cli_inline("sign", "--key", str(key), "--dir", str(model))
        assert signed.returncode == 0, signed.stderr
        assert "model.joblib" in signed.stdout
        manifest = json.loads((model / "inference-guard-manifest.json").read_text())
        assert set(manifest["files"]) == {"model.joblib", "model-settings.json"}
        ok = cli_inline("sign", "--verify", f"{key}.pub", "--dir", str(model))
        assert ok.returncode == 0, ok.stdout
        settings = model / "model-settings.json"
        settings.write_text(settings.read_text().replace("v1", "v2"))
        bad = cli("sign", "--verify", f"{key}.pub", "--dir", str(model))
        assert bad.returncode == 1
        assert "FAIL modified: model-settings.json" in bad.stdout
        as_json = cli_inline("sign", "--verify", f"{key}.pub", "--dir", str(model), "--json")
        doc = json.loads(as_json.stdout)
        assert as_json.returncode == 1 and doc["ok"] is False
        assert {"kind": "modified", "path": "model-settings.json"}.items() <= doc["problems"][0].items()

    def test_refuses_a_non_ed25519_key(self, tmp_path: Path) -> None:
        """An RSA key is refused with exit 2 and a message naming the problem."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        key = tmp_path / "rsa.pem"
        key.write_bytes(pem)
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "w.bin").write_bytes(b"\x00")
        proc = cli_inline("sign", "--key", str(key), "--dir", str(tmp_path / "model"))
        assert proc.returncode == 2
        assert "not an Ed25519 key" in proc.stderr


class TestCanaryReload:
    async def test_corrupt_set_refused_new_set_swapped(self, tmp_path: Path, mlserver: ModelServer,
                                                       reference: Path, start_guard: GuardFactory) -> None:
        """A canary set whose array no longer matches its hash is refused (event, metric) and the last good set
        keeps checking; a valid new set replaces it and is checked at once."""
        live = tmp_path / "canaries"
        done = await asyncio.to_thread(record, mlserver, reference, live, "--label-column", "label")
        assert done.returncode == 0, done.stderr
        staged = tmp_path / "staged"
        done = await asyncio.to_thread(record, mlserver, reference, staged, "--label-column", "label", "--seed", "7")
        assert done.returncode == 0, done.stderr
        guard = await start_guard(mlserver.url, canaries=str(live), canary_interval=60.0)
        integrity = guard.state.integrity
        first = integrity.revisions["digits"]
        assert await wait_for(lambda: integrity.score("digits") == 0.0, timeout=10)

        npz = live / "canaries.npz"
        data = bytearray(npz.read_bytes())
        data[-64] ^= 0xFF
        npz.write_bytes(bytes(data))
        assert await wait_for(lambda: any(e["message"].startswith("canary set rejected") for e in guard.events),
                              timeout=10)
        assert integrity.revisions["digits"] == first
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_integrity_canary_reloads_total", {"result": "failed"}) == 1

        passes = registry.get_sample_value("inference_guard_integrity_checks_total",
                                           {"check": "canary", "result": "pass"}) or 0
        shutil.copy(staged / "canaries.npz", live / "canaries.npz")
        shutil.copy(staged / "canaries.json", live / "canaries.json")
        second = load_canaries(staged).revision
        assert await wait_for(lambda: integrity.revisions["digits"] == [second], timeout=10)
        assert await wait_for(lambda: registry.get_sample_value(
            "inference_guard_integrity_checks_total", {"check": "canary", "result": "pass"}) > passes, timeout=10)
        assert registry.get_sample_value("inference_guard_integrity_canary_set_info",
                                         {"model": "digits", "revision": second}) == 1
        assert registry.get_sample_value("inference_guard_integrity_canary_set_info",
                                         {"model": "digits", "revision": first[0]}) is None
