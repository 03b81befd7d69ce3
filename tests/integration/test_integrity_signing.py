"""Signed model files in front of a real MLServer: a modified byte, a missing file, an extra file and a manifest
signed with another key are each detected, named in the alert and answered 503 under a block policy."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard_agent.integrity import MANIFEST_FILE, sign_directory
from tests._support.waiting import wait_for
from tests.conftest import DigitsData, GuardFactory, ModelServer, v2_body

pytestmark = pytest.mark.slow

Restore = Callable[[], object]

INFER = "/v2/models/digits/infer"
JSON = {"Content-Type": "application/json"}


def write_policy(tmp_path: Path, action: str) -> str:
    p = tmp_path / "policy.yaml"
    p.write_text(f"version: 1\nmode: enforce\nintegrity:\n  on_violation: {action}\n")
    return str(p)


def signed_copy(mlserver: ModelServer, tmp_path: Path) -> tuple[Path, Path, Ed25519PrivateKey]:
    """A copy of the served model's directory, signed; returns it, the public key file and the key."""
    model_dir = tmp_path / "model"
    shutil.copytree(mlserver.root / "digits", model_dir)
    key = Ed25519PrivateKey.generate()
    sign_directory(model_dir, key)
    pub = tmp_path / "model-signing.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return model_dir, pub, key


def violations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event", {}).get("action") == "integrity_violation" and "http" not in e]


def flip_byte(path: Path) -> Restore:
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return lambda: path.write_bytes(original)


def remove(path: Path) -> Restore:
    original = path.read_bytes()
    path.unlink()
    return lambda: path.write_bytes(original)


def add(path: Path) -> Restore:
    path.parent.mkdir(exist_ok=True)
    path.write_text("import os  # not part of the approved model\n")
    return path.unlink


def resign(model_dir: Path, right: Ed25519PrivateKey) -> Restore:
    sign_directory(model_dir, Ed25519PrivateKey.generate())

    def restore() -> None:
        sign_directory(model_dir, right)

    return restore


TAMPERING: dict[str, tuple[Callable[[Path, Ed25519PrivateKey], Restore], str, str]] = {
    "modified": (lambda d, key: flip_byte(d / "model.joblib"), "modified", "model.joblib"),
    "missing": (lambda d, key: remove(d / "model-settings.json"), "missing", "model-settings.json"),
    "extra": (lambda d, key: add(d / "extra" / "hook.py"), "extra", "extra/hook.py"),
    "other_key": (lambda d, key: resign(d, key), "signature_invalid", MANIFEST_FILE),
}


class TestSignedModelFiles:
    @pytest.mark.parametrize("case", sorted(TAMPERING))
    async def test_tampering_named_blocked_and_restored(self, case: str, tmp_path: Path, mlserver: ModelServer,
                                                        digits: DigitsData, start_guard: GuardFactory) -> None:
        """The tampering is named (kind and file) in an integrity_violation alert, requests get 503 while it
        lasts, and restoring the approved files lets traffic flow again."""
        model_dir, pub, key = signed_copy(mlserver, tmp_path)
        guard = await start_guard(mlserver.url, policy=write_policy(tmp_path, "block"), model_dir=str(model_dir),
                                  model_public_key_file=str(pub))
        assert guard.state.integrity.score("digits") == 0.0
        assert any(e["message"].startswith("model files verified") for e in guard.events)
        body = v2_body(digits.X_test[:1])
        tamper, kind, named = TAMPERING[case]
        async with aiohttp.ClientSession() as client:
            async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                assert resp.status == 200
            restore = tamper(model_dir, key)
            assert await wait_for(lambda: violations(guard.events), timeout=10), "no alert"
            alert = violations(guard.events)[0]
            assert alert["rule"]["name"] == "model-integrity"
            assert alert["threat"]["technique"]["id"] == "AML.T0018"
            assert alert["guard"]["check"] == "signature"
            assert {"kind": kind, "path": named} in [{k: p.get(k) for k in ("kind", "path")}
                                                     for p in alert["guard"]["problems"]]
            assert named in alert["message"]
            async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "integrity_violation"
            registry = guard.state.metrics.registry
            assert registry.get_sample_value("inference_guard_integrity_failing",
                                             {"check": "signature", "model": "*"}) == 1
            restore()
            assert await wait_for(lambda: guard.state.integrity.score("digits") == 0.0, timeout=10)
            async with client.post(guard.url + INFER, data=body, headers=JSON) as resp:
                assert resp.status == 200
        assert any(e.get("event", {}).get("action") == "integrity_restored" for e in guard.events)

    @pytest.mark.parametrize(("on_violation", "action", "rule"), [("flag", "flag", "model-integrity"),
                                                                   ("monitor", "allow", "default")])
    async def test_tampered_before_start_acts_from_the_first_request(
            self, on_violation: str, action: str, rule: str, tmp_path: Path, mlserver: ModelServer,
            digits: DigitsData, start_guard: GuardFactory) -> None:
        """Files are verified before the guard serves: the very first response is flagged under
        on_violation: flag, and only the alert is raised under monitor; both still answer."""
        model_dir, pub, _ = signed_copy(mlserver, tmp_path)
        flip_byte(model_dir / "model.joblib")
        guard = await start_guard(mlserver.url, policy=write_policy(tmp_path, on_violation),
                                  model_dir=str(model_dir), model_public_key_file=str(pub))
        async with aiohttp.ClientSession() as client, \
                client.post(guard.url + INFER, data=v2_body(digits.X_test[:1]), headers=JSON) as resp:
            assert resp.status == 200
            request_id = resp.headers["X-Request-Id"]
        decision = guard.events_for(request_id)[0]
        assert decision["event"]["action"] == action
        assert decision["rule"]["name"] == rule
        assert decision["guard"]["scores"]["integrity.canary"] == 1.0
        alert = violations(guard.events)[0]
        assert alert["guard"]["trigger"] == "start"
        assert alert["guard"]["on_violation"] == on_violation
