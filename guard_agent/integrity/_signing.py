"""Signed model directories: a manifest of every file's sha256, signed with Ed25519.

``sign_directory`` writes ``inference-guard-manifest.json`` and ``inference-guard-manifest.sig`` (base64 of
the raw 64-byte signature over the exact manifest bytes) into the model directory. ``verify_directory``
checks the signature with the public key first (a manifest signed by another key is not trusted at all),
then every file: modified, missing and extra files are each named. Names starting with ``..`` (the kubelet's
atomic-writer bookkeeping of Secret/ConfigMap volumes) are not model files and are skipped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MANIFEST_FILE",
    "SIGNATURE_FILE",
    "Problem",
    "SigningError",
    "VerifyReport",
    "build_manifest",
    "directory_snapshot",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_directory",
    "verify_directory",
]

MANIFEST_FILE = "inference-guard-manifest.json"
SIGNATURE_FILE = "inference-guard-manifest.sig"
FORMAT = "inference-guard-model-manifest"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


class SigningError(ValueError):
    """A key or directory cannot be used for signing or verification."""


@dataclass(frozen=True)
class Problem:
    """One reason a directory failed verification; ``path`` is relative to the model directory."""

    kind: str  # manifest_missing | manifest_invalid | signature_missing | signature_invalid | modified | missing
    #            | extra | unreadable | public_key_invalid
    path: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("kind", self.kind), ("path", self.path), ("detail", self.detail)) if v}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of one verification."""

    ok: bool
    problems: tuple[Problem, ...]
    files: int
    key_id: str | None


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (sha256 of its raw bytes, first 16 hex digits)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8, as ``openssl genpkey -algorithm ed25519`` writes)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SigningError(f"{path}: cannot read private key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise SigningError(f"{path}: cannot read public key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def _model_files(directory: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every model file. Symlinks are followed (the model server follows
    them too; Secret/ConfigMap volumes are made of them), each real directory is walked once (no cycles)."""
    found: dict[str, Path] = {}
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".."))
        for name in files:
            if name.startswith(".."):
                continue
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if rel in (MANIFEST_FILE, SIGNATURE_FILE):
                continue
            found[rel] = path
    return dict(sorted(found.items()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest document for a directory as it is now."""
    d = Path(directory)
    if not d.is_dir():
        raise SigningError(f"{d}: not a directory")
    files = {rel: {"sha256": _sha256(p), "size": p.stat().st_size} for rel, p in _model_files(d).items()}
    if not files:
        raise SigningError(f"{d}: no files to sign")
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "algorithm": "sha256", "signature": "ed25519",
            "files": files}


def sign_directory(directory: str | os.PathLike[str], private: Ed25519PrivateKey) -> dict[str, Any]:
    """Write the manifest and its signature into ``directory``; returns the manifest."""
    d = Path(directory)
    manifest = build_manifest(d)
    manifest["key_id"] = key_id(private.public_key())
    manifest["signed_at"] = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    signature = base64.b64encode(private.sign(data)) + b"\n"
    (d / MANIFEST_FILE).write_bytes(data)
    (d / SIGNATURE_FILE).write_bytes(signature)
    return manifest


def verify_directory(directory: str | os.PathLike[str], public: Ed25519PublicKey) -> VerifyReport:
    """Check the signature, then every file against the manifest; each problem is named."""
    d = Path(directory)
    kid = key_id(public)
    try:
        data = (d / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        return VerifyReport(False, (Problem("manifest_missing", MANIFEST_FILE, exc.strerror),), 0, kid)
    try:
        signature = base64.b64decode((d / SIGNATURE_FILE).read_bytes().strip(), validate=True)
    except OSError as exc:
        return VerifyReport(False, (Problem("signature_missing", SIGNATURE_FILE, exc.strerror),), 0, kid)
    except (binascii.Error, ValueError):
        return VerifyReport(False, (Problem("signature_invalid", SIGNATURE_FILE, "not base64"),), 0, kid)
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return VerifyReport(False, (Problem("signature_invalid", MANIFEST_FILE,
                                            f"not signed by the key {kid} (another key, or the manifest "
                                            "was edited)"),), 0, kid)
    try:
        manifest = json.loads(data)
        listed = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(listed, dict):
            raise ValueError("not a model manifest")
    except (ValueError, KeyError, TypeError) as exc:
        return VerifyReport(False, (Problem("manifest_invalid", MANIFEST_FILE, str(exc)),), 0, kid)
    present = _model_files(d)
    problems: list[Problem] = []
    for rel, entry in sorted(listed.items()):
        path = present.get(rel)
        if path is None:
            problems.append(Problem("missing", rel))
            continue
        try:
            digest = _sha256(path)
        except OSError as exc:
            problems.append(Problem("unreadable", rel, exc.strerror))
            continue
        if not isinstance(entry, dict) or digest != entry.get("sha256"):
            problems.append(Problem("modified", rel, "sha256 differs from the signed manifest"))
    problems.extend(Problem("extra", rel, "not in the signed manifest") for rel in present if rel not in listed)
    return VerifyReport(not problems, tuple(problems), len(listed), kid)


def directory_snapshot(directory: str | os.PathLike[str]) -> frozenset[tuple[str, int, int, int, int]]:
    """Cheap identity of every file (name, device, inode, size, mtime): a change triggers a full verify."""
    d = Path(directory)
    out: set[tuple[str, int, int, int, int]] = set()
    try:
        candidates = [*_model_files(d).items(), (MANIFEST_FILE, d / MANIFEST_FILE),
                      (SIGNATURE_FILE, d / SIGNATURE_FILE)]
    except OSError:
        return frozenset()
    for rel, path in candidates:
        try:
            st = path.stat()
        except OSError:
            continue
        out.add((rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return frozenset(out)
