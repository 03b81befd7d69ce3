"""GlobalFingerprintIndex: near-duplicate queries across all sessions, bounded by ``max_entries``.

Catches one attack spread over many API keys: each key alone may send too few near-duplicates, but
together they form a tight cluster. Entries live in a ring (oldest overwritten first); a bucketed
table over the ``n_index`` smallest hashes of each fingerprint finds candidates, which are verified
by counting shared hashes. Only matches from *other* sessions within ``window_s`` seconds count (a
session's own near-duplicates are the per-session tracker's job), and identical fingerprints are not
stored twice nor counted (many clients sending the same public input is not an attack signal).
Memory: about ``max_entries * (8 * n_hashes + 24) + 8 * max_entries * n_index / bucket_size * 2``
bytes, e.g. ~45 MB for 200k entries of 20 hashes. Share the SessionTrackers salt across replicas.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


class GlobalFingerprintIndex:
    """In-memory index shared by all sessions of one process."""

    def __init__(
        self,
        *,
        max_entries: int = 200_000,
        match_threshold: float = 0.5,
        window_s: float = 600.0,
        n_index: int = 8,
        bucket_size: int = 16,
        m_half: float = 8.0,
    ) -> None:
        """``match_threshold``: share of a fingerprint's hashes two queries must have in common."""
        if max_entries < 1 or not 0.0 < match_threshold <= 1.0 or n_index < 1 or bucket_size < 1 or m_half <= 0:
            raise ValueError("invalid GlobalFingerprintIndex parameters")
        self.max_entries = int(max_entries)
        self.match_threshold = float(match_threshold)
        self.window_s = float(window_s)
        self.n_index = int(n_index)
        self.m_half = float(m_half)
        self.bucket_size = int(bucket_size)
        n_buckets = 1 << max(4, math.ceil(math.log2(max(1, max_entries * n_index // bucket_size) * 2)))
        self._table = np.full((n_buckets, bucket_size), -1, dtype=np.int32)
        self._bucket_head = np.zeros(n_buckets, dtype=np.uint8)
        self._fps: np.ndarray | None = None
        self._session = np.zeros(self.max_entries, dtype=np.uint64)
        self._time = np.full(self.max_entries, -np.inf)
        self._head = 0
        self._count = 0

    def __len__(self) -> int:
        """Number of stored fingerprints."""
        return self._count

    def observe(self, session_id: str, fingerprints: np.ndarray, now: float) -> float:
        """Insert the request's fingerprints and return ``session.global_fingerprint``: 1 - 2^(-m/m_half)
        for the row with most matches m (near-duplicate earlier queries of other sessions)."""
        fps = np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))
        if self._fps is None:
            self._fps = np.zeros((self.max_entries, fps.shape[1]), dtype=np.uint64)
        if fps.shape[1] != self._fps.shape[1]:
            raise ValueError("fingerprint width differs from the index's")
        sid = np.uint64(int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(), "little"))
        best = 0
        for row in fps:
            nz = row[row != 0]
            if nz.size == 0:
                continue
            keys = np.sort(nz)[: self.n_index]
            buckets = (keys % np.uint64(self._table.shape[0])).astype(np.int64)
            cand = np.unique(self._table[buckets].ravel())
            cand = cand[cand >= 0]
            identical = False
            if cand.size:
                stored = self._fps[cand]
                shared = np.isin(stored, nz).sum(axis=1) - np.sum(stored == 0, axis=1) * int(0 in nz)
                need = max(1, math.ceil(self.match_threshold * nz.size))
                same = np.all(stored == row, axis=1)
                identical = bool(np.any(same))
                recent = self._time[cand] >= now - self.window_s
                other = self._session[cand] != sid
                best = max(best, int(np.sum((shared >= need) & ~same & recent & other)))
            if not identical:
                self._insert(row, keys, buckets, sid, now)
        return float(1.0 - 2.0 ** (-best / self.m_half))

    def _insert(self, row: np.ndarray, keys: np.ndarray, buckets: np.ndarray, sid: np.uint64, now: float) -> None:
        assert self._fps is not None
        slot = self._head
        self._fps[slot] = row
        self._session[slot] = sid
        self._time[slot] = now
        self._head = (self._head + 1) % self.max_entries
        self._count = min(self._count + 1, self.max_entries)
        width = self._table.shape[1]
        for b in np.unique(buckets):
            h = int(self._bucket_head[b])
            self._table[b, h] = slot
            self._bucket_head[b] = (h + 1) % width
