"""Encrypted feature capture: AES-256-GCM per record, key derived from the operator's secret.

Raw inputs are sensitive (they may be personal data), so the capture never
writes them in clear. When the operator sets ``GUARD_CAPTURE_KEY`` (or
``GUARD_CAPTURE_KEY_FILE``, a mounted Secret), each record's feature matrix is
sealed on its own: a fresh 96-bit nonce, the request id as associated data (a
sealed blob moved to another record fails to open), and a key id so that a
wrong key is reported as such rather than as corruption.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["ALGORITHM", "SealError", "derive_key", "key_id", "open_features", "seal_features"]

ALGORITHM = "A256GCM"
_INFO = b"inference-guard capture v1"


class SealError(ValueError):
    """A sealed record cannot be opened (wrong key, tampered or malformed)."""


def derive_key(secret: str | bytes) -> bytes:
    """A 256-bit AES key from the operator's secret (any length; use 32+ random bytes)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    if not raw.strip():
        raise ValueError("the capture key is empty")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(raw.strip())


@functools.lru_cache(maxsize=8)
def key_id(key: bytes) -> str:
    """A short, non-secret fingerprint of the derived key (tells a wrong key from a broken record)."""
    return hashlib.sha256(b"kid:" + key).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _aead(key: bytes) -> AESGCM:
    """One cipher object per key (building it per record costs more than the encryption)."""
    return AESGCM(key)


def seal_features(features: np.ndarray, key: bytes, *, associated: str) -> dict[str, Any]:
    """Encrypt one request's feature matrix (float64, little-endian) for the capture file."""
    matrix = np.ascontiguousarray(features, dtype="<f8")
    nonce = os.urandom(12)
    ct = _aead(key).encrypt(nonce, matrix.tobytes(), associated.encode())
    return {"alg": ALGORITHM, "kid": key_id(key), "shape": list(matrix.shape),
            "nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(ct).decode()}


def open_features(sealed: Mapping[str, Any], key: bytes, *, associated: str) -> np.ndarray:
    """Decrypt a sealed feature matrix; raises SealError when it cannot be trusted."""
    if sealed.get("alg") != ALGORITHM:
        raise SealError(f"unsupported algorithm {sealed.get('alg')!r}")
    if sealed.get("kid") != key_id(key):
        raise SealError("sealed with a different capture key")
    try:
        shape = tuple(int(n) for n in sealed["shape"])
        nonce = base64.b64decode(sealed["nonce"], validate=True)
        ct = base64.b64decode(sealed["ct"], validate=True)
        plain = _aead(key).decrypt(nonce, ct, associated.encode())
    except (KeyError, TypeError, ValueError, InvalidTag) as exc:
        raise SealError("sealed features are malformed or were tampered with") from exc
    if len(shape) != 2 or shape[0] * shape[1] * 8 != len(plain):
        raise SealError("sealed features do not match their declared shape")
    return np.frombuffer(plain, dtype="<f8").reshape(shape).astype(np.float64)
