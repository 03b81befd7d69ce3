"""Signed model manifests: every kind of tampering is detected and named; kubelet bookkeeping is ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard_agent.integrity import MANIFEST_FILE, SIGNATURE_FILE, build_manifest, sign_directory, verify_directory
from guard_agent.integrity._signing import directory_snapshot


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(os.urandom(4096))
    (d / "config.json").write_text('{"layers": 3}')
    (d / "sub" / "vocab.txt").write_text("a\nb\n")
    return d


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def kinds(report: object) -> set[tuple[str, str | None]]:
    return {(p.kind, p.path) for p in report.problems}  # type: ignore[attr-defined]


class TestVerify:
    def test_signed_directory_verifies(self, model: Path, key: Ed25519PrivateKey) -> None:
        """A freshly signed directory passes with every file counted."""
        manifest = sign_directory(model, key)
        assert set(manifest["files"]) == {"weights.bin", "config.json", "sub/vocab.txt"}
        report = verify_directory(model, key.public_key())
        assert report.ok
        assert report.files == 3

    def test_modified_byte(self, model: Path, key: Ed25519PrivateKey) -> None:
        """One flipped bit in a weight file is named as modified."""
        sign_directory(model, key)
        data = bytearray((model / "weights.bin").read_bytes())
        data[100] ^= 0x01
        (model / "weights.bin").write_bytes(bytes(data))
        assert kinds(verify_directory(model, key.public_key())) == {("modified", "weights.bin")}

    def test_missing_and_extra(self, model: Path, key: Ed25519PrivateKey) -> None:
        """A deleted file is missing and an added one extra, each by its relative path."""
        sign_directory(model, key)
        (model / "sub" / "vocab.txt").unlink()
        (model / "sub" / "trigger.txt").write_text("backdoor")
        assert kinds(verify_directory(model, key.public_key())) == {("missing", "sub/vocab.txt"),
                                                                    ("extra", "sub/trigger.txt")}

    def test_other_key(self, model: Path, key: Ed25519PrivateKey) -> None:
        """A manifest signed by another key is not trusted at all."""
        sign_directory(model, Ed25519PrivateKey.generate())
        report = verify_directory(model, key.public_key())
        assert kinds(report) == {("signature_invalid", MANIFEST_FILE)}

    def test_edited_manifest(self, model: Path, key: Ed25519PrivateKey) -> None:
        """Re-hashing a swapped file into the manifest breaks the signature."""
        sign_directory(model, key)
        (model / "weights.bin").write_bytes(b"swapped")
        doc = json.loads((model / MANIFEST_FILE).read_text())
        doc["files"]["weights.bin"] = build_manifest(model)["files"]["weights.bin"]
        (model / MANIFEST_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        assert kinds(verify_directory(model, key.public_key())) == {("signature_invalid", MANIFEST_FILE)}

    def test_unsigned_directory(self, model: Path, key: Ed25519PrivateKey) -> None:
        """No manifest, or a manifest without signature, fails with its own reason."""
        assert kinds(verify_directory(model, key.public_key())) == {("manifest_missing", MANIFEST_FILE)}
        sign_directory(model, key)
        (model / SIGNATURE_FILE).unlink()
        assert kinds(verify_directory(model, key.public_key())) == {("signature_missing", SIGNATURE_FILE)}

    def test_kubelet_bookkeeping_ignored(self, model: Path, key: Ed25519PrivateKey) -> None:
        """Secret/ConfigMap volumes hold ``..data`` and timestamped ``..2024_...`` entries: not model files."""
        sign_directory(model, key)
        (model / "..2026_01_01_00_00_00.1").mkdir()
        (model / "..2026_01_01_00_00_00.1" / "x").write_text("x")
        (model / "..data").symlink_to("..2026_01_01_00_00_00.1")
        assert verify_directory(model, key.public_key()).ok


class TestSnapshot:
    def test_snapshot_changes_with_content(self, model: Path, key: Ed25519PrivateKey) -> None:
        """Rewriting a file changes the cheap snapshot that triggers a full verification."""
        sign_directory(model, key)
        before = directory_snapshot(model)
        assert before == directory_snapshot(model)
        (model / "config.json").write_text('{"layers": 4}')
        assert directory_snapshot(model) != before

    def test_empty_directory_cannot_be_signed(self, tmp_path: Path, key: Ed25519PrivateKey) -> None:
        """Signing nothing is refused rather than producing a manifest that approves any future file."""
        from guard_agent.integrity import SigningError

        with pytest.raises(SigningError, match="no files"):
            sign_directory(tmp_path, key)


class TestSymlinks:
    def test_symlinked_directory_is_covered(self, tmp_path: Path, key: Ed25519PrivateKey) -> None:
        """Files reached through a symlinked subdirectory (as in a ConfigMap volume with item paths) are
        signed and verified like any other."""
        real = tmp_path / "store" / "v1"
        real.mkdir(parents=True)
        (real / "weights.bin").write_bytes(b"approved")
        model = tmp_path / "model"
        model.mkdir()
        (model / "v1").symlink_to(real)
        (model / "loop").symlink_to(model)  # a cycle must not hang the walk
        manifest = sign_directory(model, key)
        assert "v1/weights.bin" in manifest["files"]
        (real / "weights.bin").write_bytes(b"tampered")
        assert ("modified", "v1/weights.bin") in kinds(verify_directory(model, key.public_key()))
