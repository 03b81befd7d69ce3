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

_U64 = np.uint64
_M64 = (1 << 64) - 1
_C0, _C1, _C2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_S27, _S30, _S31, _S48 = _U64(27), _U64(30), _U64(31), _U64(48)
_ONE = _U64(1)
_MAX = _U64(_M64)
_TRUE = np.ones(1, dtype=bool)
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
    z = z + _C0
    z ^= z >> _S30
    z *= _C1
    z ^= z >> _S27
    z *= _C2
    z ^= z >> _S31
    return z


def mix_int(z: int) -> int:
    """:func:`mix` of one value as a Python int (no array round trip for a single row)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def window_hashes(
    X: np.ndarray,
    center: np.ndarray,
    step: np.ndarray,
    offsets: np.ndarray,
    window: int,
    keys: np.ndarray,
) -> np.ndarray:
    """Hashes of every (grid, window) of every row: shape (rows, grids * n_windows), all non-zero.

    A window's hash is ``mix(sum_j q[i + j] * keys[grids + j] ^ keys[g])`` in wrapping uint64 arithmetic;
    the sum is taken as ``window`` shifted slices (addition mod 2^64 is exact in any order), which costs a
    few ufunc calls instead of a strided window view."""
    z = (X - center) / step
    np.maximum(z, -_MASK_CLIP, out=z)
    np.minimum(z, _MASK_CLIP, out=z)  # == np.clip
    grids = offsets.shape[0]
    n_win = X.shape[1] - window + 1
    out = np.empty((X.shape[0], grids * n_win), dtype=_U64)
    tmp = np.empty((X.shape[0], n_win), dtype=_U64)
    for g in range(grids):
        q = np.floor(z + offsets[g]).astype(np.int64).view(_U64)
        h = out[:, g * n_win : (g + 1) * n_win]
        np.multiply(q[:, :n_win], keys[grids], out=h)
        for j in range(1, window):
            np.multiply(q[:, j : j + n_win], keys[grids + j], out=tmp)
            h += tmp
        h ^= keys[g]
    out = mix(out)
    out |= _ONE
    return out


class WindowHasher:
    """:func:`window_hashes` for fixed parameters, with its constants prepared once. A single row (the usual
    request) takes each grid's window sums as one wrapping uint64 product with a banded key matrix, instead
    of ``2 * window - 1`` array operations (same values: addition and multiplication mod 2^64)."""

    # the banded product costs d * n_windows multiply-adds against 2 * window - 1 array operations: it wins
    # for short rows (measured: 64 features, windows of 4), not for long ones
    _BANDED_MAX_TERMS = 8192

    def __init__(self, center: np.ndarray, step: np.ndarray, offsets: np.ndarray, window: int,
                 keys: np.ndarray) -> None:
        self._args = (center, step, offsets, window, keys)
        self._center, self._step, self._offsets, self._keys = center, step, offsets, keys
        d, grids = center.shape[0], offsets.shape[0]
        n_win = d - window + 1
        self._n_win = n_win
        self._grid_keys = [keys[g] for g in range(grids)]
        self._banded: np.ndarray | None = None
        if d * n_win <= self._BANDED_MAX_TERMS:
            banded = np.zeros((d, n_win), dtype=_U64)
            cols = np.arange(n_win)
            for j in range(window):
                banded[cols + j, cols] = keys[grids + j]
            banded.flags.writeable = False
            self._banded = banded

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Hashes of every (grid, window) of every row of 2-D float64 ``X``, as :func:`window_hashes`."""
        if X.shape[0] != 1 or self._banded is None:
            return window_hashes(X, *self._args)
        z = (X - self._center) / self._step
        np.maximum(z, -_MASK_CLIP, out=z)
        np.minimum(z, _MASK_CLIP, out=z)  # == np.clip
        n_win = self._n_win
        out = np.empty((1, len(self._grid_keys) * n_win), dtype=_U64)
        for g, key in enumerate(self._grid_keys):
            q = np.floor(z + self._offsets[g]).astype(np.int64).view(_U64)
            h = out[:, g * n_win : (g + 1) * n_win]
            np.matmul(q, self._banded, out=h)
            h ^= key
        out = mix(out)
        out |= _ONE
        return out


def bottom_k(hashes: np.ndarray, k: int) -> np.ndarray:
    """The k smallest distinct hashes per row, padded with 0 when a row has fewer than k.

    The all-ones value is the sorting sentinel for duplicates: a hash equal to it is dropped too (becomes
    padding), in the one-row shortcut as in the general case."""
    if hashes.shape[0] == 1:
        s = np.sort(hashes[0])
        distinct = s[np.concatenate((_TRUE, s[1:] != s[:-1]))] if s.size > 1 else s
        out = np.zeros((1, k), dtype=_U64)
        top = distinct[:k]
        out[0, : top.size] = top
        if top.size and top[-1] == _MAX:
            out[out == _MAX] = 0
        return out
    s = np.sort(hashes, axis=1)
    dup = np.zeros_like(s, dtype=bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    s[dup] = _MAX
    s.sort(axis=1)
    s = s[:, :k].copy() if s.shape[1] > k else s
    s[s == _MAX] = 0
    if s.shape[1] < k:
        s = np.concatenate([s, np.zeros((s.shape[0], k - s.shape[1]), dtype=_U64)], axis=1)
    return s


def compact(fps: np.ndarray) -> np.ndarray:
    """Keep the top 16 bits of each hash for per-session storage (0 stays 0 = padding)."""
    c = (fps >> _S48).astype(np.uint16)
    np.maximum(c, fps != 0, out=c)  # a non-zero hash below 2**48 keeps a non-zero compact value, 1
    return c


def shared_counts(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """For each stored fingerprint (rows of ``stored``), how many non-padding hashes it shares with query.

    Compact (uint16) hashes are looked up in a table over every 16-bit value that marks the query's
    non-zero hashes; others by binary search in the sorted non-zero query hashes. Both count what comparing
    every pair counts."""
    if stored.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if query.dtype == np.uint16 and stored.dtype == np.uint16:
        table = np.zeros(1 << 16, dtype=bool)
        table[query] = True
        table[0] = False  # padding never matches
        found = table.take(stored)
    else:
        q = np.sort(query[query != 0])
        if q.size == 0:
            return np.zeros(stored.shape[0], dtype=np.int64)
        idx = q.searchsorted(stored)
        np.minimum(idx, q.size - 1, out=idx)
        found = q.take(idx) == stored
    counts: np.ndarray = (found @ np.ones(found.shape[1])).astype(np.int64)  # exact; faster than a short-axis sum
    return counts


def shared_counts_many(queries: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """:func:`shared_counts` of compact fingerprints, several queries at once: ``queries`` (q, hashes), each
    against its own ``stored`` (q, ring, hashes); counts (q, ring). Each query's hashes are shifted into a
    range of its own (its index times 2**16), so one sorted array and one binary search serve them all."""
    if queries.shape[0] == 1:
        return shared_counts(queries[0], stored[0])[None]
    shift = np.arange(queries.shape[0], dtype=np.int64) << 16
    q = queries.astype(np.int64)
    q += shift[:, None]
    q = np.sort(q[queries != 0])  # padding never matches
    if q.size == 0:
        return np.zeros(stored.shape[:2], dtype=np.int64)
    s = stored.astype(np.int64)
    s += shift[:, None, None]
    idx = q.searchsorted(s)
    np.minimum(idx, q.size - 1, out=idx)
    found = q.take(idx) == s
    found &= stored != 0
    counts: np.ndarray = np.add.reduce(found, axis=2, dtype=np.int64)
    return counts


def row_digest(X: np.ndarray) -> np.ndarray:
    """Exact-repeat detector: a 64-bit hash of each row's float64 bytes (not salted, not stored raw)."""
    return np.array(row_digest_ints(X), dtype=_U64)


def row_digest_ints(X: np.ndarray) -> list[int]:
    """:func:`row_digest` as Python ints."""
    xs = np.ascontiguousarray(X, dtype=np.float64)
    return [int.from_bytes(hashlib.blake2b(r.data, digest_size=8).digest(), "little") | 1 for r in xs]
