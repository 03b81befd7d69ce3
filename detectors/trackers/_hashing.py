"""Salted near-duplicate fingerprints (the Blacklight idea) for any numeric feature vector.

A row is standardised and quantised (per-feature step fitted on reference data, a fixed dither per
grid), overlapping windows of ``window`` consecutive quantised values are hashed with keys derived from
a secret salt, and the ``n_hashes`` smallest distinct hashes form the fingerprint (a bottom-k sketch:
two rows share many of them when most of their windows agree). The salt keeps an attacker from
predicting which perturbations change the fingerprint. Hash value 0 is reserved for padding.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_U64 = np.uint64
_MASK_CLIP = 1e12
_SALT_DOMAIN = b"inference-guard/fingerprint/v1"


def derive_keys(salt: bytes, count: int) -> np.ndarray:
    """Derive ``count`` odd 64-bit keys from the secret salt (shake-256, domain separated)."""
    if not isinstance(salt, bytes | bytearray) or len(salt) < 8:
        raise ValueError("salt must be at least 8 bytes")
    raw = hashlib.shake_256(_SALT_DOMAIN + bytes(salt)).digest(8 * count)
    return np.frombuffer(raw, dtype="<u8").astype(_U64) | _U64(1)


def mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps by design)."""
    z = z + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> _U64(31))
    return out


def window_hashes(
    X: np.ndarray,
    center: np.ndarray,
    step: np.ndarray,
    offsets: np.ndarray,
    window: int,
    keys: np.ndarray,
) -> np.ndarray:
    """Hashes of every (grid, window) of every row: shape (rows, grids * n_windows), all non-zero."""
    z = np.clip((X - center) / step, -_MASK_CLIP, _MASK_CLIP)
    grids = offsets.shape[0]
    mult = keys[grids : grids + window]
    parts = []
    for g in range(grids):
        q = np.floor(z + offsets[g]).astype(np.int64).view(_U64)
        w = sliding_window_view(q, window, axis=1)
        h = (w * mult).sum(axis=2, dtype=_U64)
        parts.append(mix(h ^ keys[g]))
    return np.concatenate(parts, axis=1) | _U64(1)


def bottom_k(hashes: np.ndarray, k: int) -> np.ndarray:
    """The k smallest distinct hashes per row, padded with 0 when a row has fewer than k."""
    s = np.sort(hashes, axis=1)
    dup = np.zeros_like(s, dtype=bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    s = np.where(dup, np.iinfo(np.uint64).max, s)
    s = np.sort(s, axis=1)[:, :k]
    s = np.where(s == np.iinfo(np.uint64).max, _U64(0), s)
    if s.shape[1] < k:
        s = np.concatenate([s, np.zeros((s.shape[0], k - s.shape[1]), dtype=_U64)], axis=1)
    return s


def compact(fps: np.ndarray) -> np.ndarray:
    """Keep the top 16 bits of each hash for per-session storage (0 stays 0 = padding)."""
    c = (fps >> _U64(48)).astype(np.uint16)
    return np.where((fps != 0) & (c == 0), np.uint16(1), c)


def shared_counts(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """For each stored fingerprint (rows of ``stored``), how many non-padding hashes it shares with query."""
    if stored.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    eq = (stored[:, :, None] == query[None, None, :]) & (query[None, None, :] != 0)
    return np.asarray(eq.any(axis=2).sum(axis=1), dtype=np.int64)


def row_digest(X: np.ndarray) -> np.ndarray:
    """Exact-repeat detector: a 64-bit hash of each row's float64 bytes (not salted, not stored raw)."""
    xs = np.ascontiguousarray(X, dtype=np.float64)
    out = np.empty(xs.shape[0], dtype=_U64)
    for i in range(xs.shape[0]):
        out[i] = int.from_bytes(hashlib.blake2b(xs[i].tobytes(), digest_size=8).digest(), "little") | 1
    return out
