"""``guard-agent sign``: sign a model directory (Ed25519 manifest of every file's sha256), or verify one.

    guard-agent sign --key model-signing.pem --dir ./model            # writes the manifest + signature
    guard-agent sign --verify model-signing.pub --dir ./model         # what the guard checks, offline
    guard-agent sign --generate-key --key model-signing.pem           # new key pair (+ model-signing.pub)

The private key never goes near the cluster: sign where the model is approved, ship the public key.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI builds every subcommand's parser: keep importing this module cheap
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard_agent.commands._convention import FAILED, OK, CommandError, add_json_argument, print_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519)")
    parser.add_argument("--dir", dest="directory", help="model directory to sign or verify")
    parser.add_argument("--verify", metavar="PUBLIC_KEY", help="verify --dir with this public key instead of signing")
    parser.add_argument("--generate-key", dest="generate_key", action="store_true",
                        help="create a new key pair at --key and --key.pub (refuses to overwrite)")
    parser.add_argument("--public-out", dest="public_out", help="also write the public key (PEM) here when signing")
    add_json_argument(parser, "the verification result (with --verify)")


def run(args: argparse.Namespace) -> int:
    from guard_agent.integrity._signing import SigningError

    try:
        if args.generate_key:
            return _generate(args)
        if not args.directory:
            raise SigningError("--dir is required")
        if args.verify:
            return _verify(args)
        if not args.key:
            raise SigningError("--key (to sign) or --verify PUBLIC_KEY (to verify) is required")
        return _sign(args)
    except SigningError as exc:
        raise CommandError(str(exc)) from exc


def _public_pem(private: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _generate(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from guard_agent.integrity._signing import SigningError, key_id

    if not args.key:
        raise SigningError("--generate-key needs --key PATH for the new private key")
    path, pub = Path(args.key), Path(args.key + ".pub")
    if path.exists() or pub.exists():
        raise SigningError(f"{path} or {pub} exists; not overwriting a key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub.write_bytes(_public_pem(private))
    print(f"wrote private key {path} (mode 0600) and public key {pub}; key id {key_id(private.public_key())}")
    return OK


def _sign(args: argparse.Namespace) -> int:
    from guard_agent.integrity._signing import MANIFEST_FILE, SIGNATURE_FILE, load_private_key, sign_directory

    private = load_private_key(args.key)
    manifest = sign_directory(args.directory, private)
    total = sum(int(f["size"]) for f in manifest["files"].values())
    print(f"signed {len(manifest['files'])} files ({total} bytes) in {args.directory} with key "
          f"{manifest['key_id']}: wrote {MANIFEST_FILE} and {SIGNATURE_FILE}")
    for rel, entry in manifest["files"].items():
        print(f"  {entry['sha256']}  {rel}")
    if args.public_out:
        Path(args.public_out).write_bytes(_public_pem(private))
        print(f"wrote public key {args.public_out}")
    return OK


def _verify(args: argparse.Namespace) -> int:
    from guard_agent.integrity._signing import load_public_key, verify_directory

    report = verify_directory(args.directory, load_public_key(args.verify))
    if args.json:
        print_json({"ok": report.ok, "files": report.files, "key_id": report.key_id,
                    "problems": [p.as_dict() for p in report.problems]})
    elif report.ok:
        print(f"ok: {report.files} files in {args.directory} match the manifest signed by key {report.key_id}")
    for problem in () if args.json else report.problems:
        print(f"FAIL {problem.kind}: {problem.path or ''}{f' ({problem.detail})' if problem.detail else ''}")
    return OK if report.ok else FAILED
