"""The trackers' shortcuts give exactly what the plain formulas give (bit for bit, not approximately).

Each shortcut (one-row paths, lookup tables, written-out numpy formulas, a trimmed scipy call) is compared
with a straightforward reference implementation written here, on random inputs chosen to hit its edge
cases: duplicates, padding zeros, colliding bits, empty inputs, infinite thresholds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import stats

from detectors.trackers import GlobalFingerprintIndex, SessionTrackers, TrackerConfig, _hashing, _prada
from detectors.trackers._features import Projector
from detectors.trackers._global import _shared, session_hash

from .conftest import SALT, Digits

_MAX = np.uint64(2**64 - 1)


def _ref_window_hashes(X: np.ndarray, center: np.ndarray, step: np.ndarray, offsets: np.ndarray, window: int,
                       keys: np.ndarray) -> np.ndarray:
    z = np.clip((X - center) / step, -1e12, 1e12)
    grids = offsets.shape[0]
    parts = []
    for g in range(grids):
        q = np.floor(z + offsets[g]).astype(np.int64).view(np.uint64)
        h = (sliding_window_view(q, window, axis=1) * keys[grids : grids + window]).sum(axis=2, dtype=np.uint64)
        parts.append(_hashing.mix(h ^ keys[g]))
    return np.concatenate(parts, axis=1) | np.uint64(1)


def _ref_bottom_k(hashes: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((hashes.shape[0], k), dtype=np.uint64)
    for i, row in enumerate(hashes):
        distinct = np.unique(row)[:k]
        out[i, : distinct.size] = np.where(distinct == _MAX, np.uint64(0), distinct)
    return out


def _ref_shared(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    eq = (stored[:, :, None] == query[None, None, :]) & (query[None, None, :] != 0)
    return np.asarray(eq.any(axis=2).sum(axis=1), dtype=np.int64)


def _random_hashes(rng: np.random.Generator, shape: tuple[int, ...], kind: int) -> np.ndarray:
    """Full-range, tiny, shared-low-bits or top-half uint64 values (kind 0-3)."""
    if kind == 0:
        return rng.integers(0, 2**64 - 1, size=shape, dtype=np.uint64, endpoint=True)
    if kind == 1:
        return rng.integers(0, 40, size=shape).astype(np.uint64)
    if kind == 2:
        return (rng.integers(0, 2**8, size=shape).astype(np.uint64) << np.uint64(int(rng.integers(0, 56)))) | 1
    return rng.integers(2**63, 2**64 - 1, size=shape, dtype=np.uint64, endpoint=True)


class TestHashing:
    @pytest.mark.parametrize("d", [1, 3, 16, 64, 100])
    @pytest.mark.parametrize("rows", [0, 1, 2, 9])
    def test_window_hashes_and_hasher_match_the_sliding_window_sum(self, d: int, rows: int) -> None:
        """Shifted-slice sums and the one-row banded product equal the strided window sum."""
        rng = np.random.default_rng(d * 10 + rows)
        keys = _hashing.derive_keys(b"fast-path-salt", d + 4)
        for window, grids in ((1, 1), (min(4, d), 2), (d, 3)):
            X = rng.normal(size=(rows, d)) * rng.choice([1e-3, 1.0, 1e14], size=(rows, 1))
            center, step = rng.normal(size=d), rng.uniform(0.05, 2.0, size=d)
            offsets = rng.uniform(size=(grids, d))
            ref = _ref_window_hashes(X, center, step, offsets, window, keys)
            assert np.array_equal(_hashing.window_hashes(X, center, step, offsets, window, keys), ref)
            hasher = _hashing.WindowHasher(center, step, offsets, window, keys)
            assert np.array_equal(hasher(X), ref)

    def test_bottom_k_matches_sorted_distinct_values(self) -> None:
        """k smallest distinct hashes, the all-ones value dropped as padding, one row or many."""
        rng = np.random.default_rng(1)
        for trial in range(400):
            width = int(rng.integers(1, 70))
            h = _random_hashes(rng, (int(rng.integers(1, 4)), width), trial % 4)
            h[rng.random(h.shape) < 0.05] = _MAX
            if trial % 5 == 0:
                h[:, : width // 2] = h[:, :1]
            for k in (1, 5, 20, 80):
                assert np.array_equal(_hashing.bottom_k(h, k), _ref_bottom_k(h, k))
                assert np.array_equal(_hashing.bottom_k(h[:1], k), _ref_bottom_k(h[:1], k))

    def test_compact_matches_its_formula(self) -> None:
        """Top 16 bits, 0 only for padding."""
        rng = np.random.default_rng(2)
        for trial in range(200):
            f = _random_hashes(rng, (int(rng.integers(0, 4)), 20), trial % 4)
            f[rng.random(f.shape) < 0.2] = 0
            c = (f >> np.uint64(48)).astype(np.uint16)
            ref = np.where((f != 0) & (c == 0), np.uint16(1), c)
            out = _hashing.compact(f)
            assert out.dtype == np.uint16 and np.array_equal(out, ref)

    @pytest.mark.parametrize("dtype", [np.uint16, np.uint64])
    def test_shared_counts_match_pairwise_comparison(self, dtype: type) -> None:
        """Table and binary-search counts equal the all-pairs count (padding zeros never match)."""
        rng = np.random.default_rng(3)
        for _ in range(1000):
            width, hi = int(rng.integers(1, 25)), int(rng.choice([3, 60, 65536]))
            query: np.ndarray = rng.integers(0, hi, size=width).astype(dtype)
            stored: np.ndarray = rng.integers(0, hi, size=(int(rng.integers(0, 30)), width)).astype(dtype)
            if stored.shape[0] and rng.random() < 0.3:
                stored[0] = query
            out = _hashing.shared_counts(query, stored)
            assert out.dtype == np.int64 and np.array_equal(out, _ref_shared(query, stored))

    def test_row_digests_and_keys(self, trackers: SessionTrackers) -> None:
        """blake2b of each row's float64 bytes; the scalar mix equals the array mix; keys agree both ways."""
        rng = np.random.default_rng(4)
        X = rng.normal(size=(9, 64))
        X[3] = X[1]
        ref = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") | 1 for r in X]
        assert _hashing.row_digest_ints(X) == ref
        assert np.array_equal(_hashing.row_digest(X), np.array(ref, dtype=np.uint64))
        for v in ref:
            assert _hashing.mix_int(v) == int(_hashing.mix(np.array([v], dtype=np.uint64))[0])
        keys = trackers.row_keys(X)
        assert np.array_equal(keys, _hashing.mix(np.array(ref, dtype=np.uint64) ^ trackers._keys[-1]) | np.uint64(1))
        for i in range(9):
            assert trackers.row_keys(X[i : i + 1])[0] == keys[i]
        fps, keys_b, digests = trackers.request_hashes(X)
        assert np.array_equal(fps, trackers.fingerprints(X)) and np.array_equal(keys_b, keys)
        assert np.array_equal(digests, _hashing.row_digest(X))


class TestGlobalShared:
    def test_direct_address_table_matches_binary_search(self) -> None:
        """Counts through the slot table equal counts by binary search, also when low bits collide, values
        are tiny (slot 0 taken or not) or the row is too long for the table."""
        rng = np.random.default_rng(5)
        for trial in range(3000):
            n = int(rng.integers(1, 90)) if trial % 3 else int(rng.integers(1, 25))
            row = np.sort(_random_hashes(rng, (n,), trial % 4))
            row = row[row != 0]
            if row.size == 0:
                continue
            extra = np.array([0, 2, 1 << 12, 1 << 23, 2**64 - 1], dtype=np.uint64)
            pool = np.concatenate([row, extra, row >> np.uint64(1), row ^ np.uint64(1 << 12),
                                   _random_hashes(rng, (10,), 0)])
            stored = rng.choice(pool, size=(int(rng.integers(0, 40)), int(rng.integers(1, 30))))
            idx = np.minimum(row.searchsorted(stored), row.size - 1)
            ref = np.count_nonzero(row[idx] == stored, axis=1)
            assert np.array_equal(_shared(stored, row), ref)


class TestProjector:
    @staticmethod
    def _reference(cfg: TrackerConfig, X: np.ndarray) -> tuple[np.ndarray, ...]:
        xs = (X - cfg.center) / cfg.scale
        coef = xs @ cfg.components.T
        z = coef * cfg.whiten
        resid = np.mean((xs - coef @ cfg.components) ** 2, axis=1)
        off = (resid > cfg.residual_threshold) | (np.mean(z**2, axis=1) > cfg.norm_threshold)
        cell = np.zeros(X.shape[0], dtype=np.int64)
        for j in range(cfg.grid_edges.shape[0]):
            cell = cell * (cfg.grid_edges.shape[1] + 1) + np.searchsorted(cfg.grid_edges[j], z[:, j], side="right")
        rare = off | (cfg.cell_probs[cell] < cfg.rare_cell_prob)
        u = np.clip((X - cfg.center) @ cfg.prada_proj, -6.0e4, 6.0e4)
        return z, u, np.where(off, cfg.n_cells, cell), rare

    def test_few_row_and_batch_paths_match_the_formulas(self, config: TrackerConfig, digits: Digits) -> None:
        """z, u, cell and rare flags agree for 1, 5 and 30 rows, for the fitted and the default config and for
        thresholds that are infinite on one side only."""
        rng = np.random.default_rng(6)
        X = np.vstack([digits.X_held[:20], rng.uniform(0, 16, size=(5, 64)), digits.X_held[:5] * 40])
        configs = [config, TrackerConfig.default(64),
                   dataclasses.replace(config, residual_threshold=math.inf),
                   dataclasses.replace(config, norm_threshold=math.inf, residual_threshold=-math.inf),
                   dataclasses.replace(config, residual_threshold=math.inf, norm_threshold=math.inf)]
        for cfg in configs:
            proj = Projector(cfg)
            for rows in (X[:1], X[20:21], X[27:28], X[:5], X):
                z, u, cell, rare = self._reference(cfg, rows)
                feats = proj(rows)
                zs, us, cells, rares = proj.rows(rows)
                for got_z, got_u, got_cell, got_rare in ((feats.z, feats.u, feats.cell, feats.rare),
                                                         (zs, us, np.array(cells), np.array(rares))):
                    assert np.array_equal(got_z, z) and np.array_equal(got_u, u)
                    assert np.array_equal(got_cell, cell) and np.array_equal(got_rare, rare)


class TestShapiro:
    def test_matches_scipy_with_numpy_moments(self) -> None:
        """W equals scipy.stats.shapiro after np.mean/np.std outlier removal, bit for bit."""

        def reference(pool: np.ndarray) -> float:
            d = pool[np.isfinite(pool)].astype(np.float64)
            if d.size >= 3:
                mu, sd = float(d.mean()), float(d.std())
                if sd > 0:
                    d = d[np.abs(d - mu) <= 3.0 * sd]
            if d.size < 3 or float(np.ptp(d)) <= 1e-12 * max(1.0, float(np.abs(d).max())):
                return 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = float(stats.shapiro(d).statistic)
            return w if math.isfinite(w) else 1.0

        rng = np.random.default_rng(7)
        for trial in range(800):
            n = int(rng.integers(0, 140))
            pool = (np.abs(rng.normal(size=n)) * rng.choice([1e-6, 1.0, 300.0])).astype(np.float16)
            if trial % 5 == 0 and n:
                pool[: n // 2] = pool[0]
            if trial % 11 == 0 and n:
                pool[:] = pool[0]
            if trial % 13 == 0 and n > 3:
                pool[-1] = 6.0e4
            assert _prada.shapiro_w(pool) == reference(pool)


class TestReferenceDensity:
    def test_matches_the_plain_count(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Share of reference rows holding at least ceil(t * nonzero) of a row's hashes (padding, no hit and
        fewer hits than needed included), one row at a time or in a batch."""
        rng = np.random.default_rng(8)
        X = np.vstack([digits.X_held[:40], rng.uniform(0, 16, size=(10, 64)), np.zeros((2, 64))])
        fps = trackers.fingerprints(X)
        fps[-1, 5:] = 0
        fps[-2] = 0
        ref_fps = trackers.fingerprints(trackers.config.ref_rows)
        # a row whose hashes found in the reference are exactly as many as needed, all in one reference row
        full = ref_fps[np.count_nonzero(ref_fps, axis=1) == ref_fps.shape[1]][0]
        fps[-3, :10], fps[-3, 10:] = full[:10], rng.integers(1, 2**63, size=ref_fps.shape[1] - 10, dtype=np.uint64)
        seen_hits = False
        for t in (0.5, 0.2, 1.0):
            expected = np.zeros(fps.shape[0])
            for i, row in enumerate(fps):
                nz = row[row != 0]
                if nz.size:
                    need = max(1, math.ceil(t * nz.size))
                    expected[i] = np.count_nonzero(_ref_shared(nz, ref_fps) >= need) / ref_fps.shape[0]
            assert np.array_equal(trackers.reference_density(fps, t), expected)
            assert all(trackers.reference_density(fps[i], t)[0] == expected[i] for i in range(fps.shape[0]))
            seen_hits = seen_hits or bool(np.count_nonzero(expected))
        assert seen_hits


def test_reference_density_cache_is_bounded_and_exact(config: TrackerConfig, digits: Digits) -> None:
    """Densities come from a cache keyed by fingerprint and threshold, bounded (oldest evicted): after more
    distinct fingerprints than it holds, every answer still equals a fresh engine's."""
    engine = SessionTrackers(config, salt=SALT)
    rng = np.random.default_rng(9)
    X = np.clip(digits.X_held[rng.integers(len(digits.X_held), size=5000)] + rng.normal(0, 0.5, (5000, 64)), 0, 16)
    fps = engine.fingerprints(X)
    first = engine.reference_density(fps)
    assert len(engine._density_cache) == 4096
    fresh = SessionTrackers(config, salt=SALT)
    assert np.array_equal(first, fresh.reference_density(fps))
    assert np.array_equal(engine.reference_density(fps[:100]), fresh.reference_density(fps[:100]))
    assert np.count_nonzero(first)

class _ReferenceIndex(GlobalFingerprintIndex):
    """The global index's observe in plain numpy (np.unique candidates, dense arithmetic throughout)."""

    def observe(self, session_id: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                density: np.ndarray | None = None) -> float:
        fps = np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))
        dig = np.asarray(digests, dtype=np.uint64).reshape(-1)
        dens = np.zeros(fps.shape[0]) if density is None else np.asarray(density, dtype=np.float64).reshape(-1)
        if self._fps is None:
            self._fps = np.zeros((self.max_entries, fps.shape[1]), dtype=np.uint64)
        sid = session_hash(session_id)
        best, oldest, volume = 0.0, now - self.window_s, self.volume(now)
        for row, digest, rho in zip(fps, dig, dens, strict=True):
            nz = row[row != 0]
            if nz.size == 0:
                continue
            if self._seen_recently(int(digest), now):
                continue  # exact repeats neither score nor count
            keys_all = np.sort(nz)
            buckets = (keys_all[: self.n_index] % np.uint64(self._table.shape[0])).astype(np.int64)
            cand = np.unique(self._table[buckets].ravel())
            cand = cand[cand >= 0]
            merge = -1
            if cand.size:
                shared = _ref_shared(keys_all, self._fps[cand])
                need = max(1, math.ceil(self.match_threshold * nz.size))
                near = (shared >= need) & (self._time[cand] >= oldest)
                counted = near & (self._session[cand] != sid)
                answered = near & (self._label[cand] >= 0)
                share = 0.0
                if answered.any():  # answers per main class, then the share outside the largest class
                    _, inverse = np.unique(self._label[cand][answered], return_inverse=True)
                    per_class = np.bincount(inverse, weights=self._same[cand][answered])
                    total = float(per_class.sum()) + float(self._flips[cand][answered].sum())
                    share = min(1.0, (total - float(per_class.max())) / (total * self.flip_share))
                m = float(np.sum(self._weight[cand][counted])) * share
                best = max(best, m / (1.0 + volume * max(0.0, float(rho))))
                if near.any():
                    merge = int(cand[np.argmax(np.where(near, shared, -1))])
            self._count_input(now)
            if merge >= 0:
                self._weight[merge] += 1.0  # entries keep their creation time
            else:
                self._insert(row, buckets, sid, now)
        return self.score(best)


class TestGlobalObserve:
    def test_matches_the_reference_index(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Scores and every stored array agree with the reference over near-duplicate clusters from several
        sessions, exact repeats, batches, densities, a full ring and a sliding window."""
        rng = np.random.default_rng(9)
        base = digits.X_held[:30]
        fast = GlobalFingerprintIndex(max_entries=300, window_s=50.0, m_half=4.0, n_index=6, bucket_size=4)
        ref = _ReferenceIndex(max_entries=300, window_s=50.0, m_half=4.0, n_index=6, bucket_size=4)
        now = 0.0
        for step in range(500):
            rows = int(rng.choice([1, 1, 1, 3, 8]))
            noise = rng.integers(0, 2, size=(rows, 64)) * (step % 3 == 0)
            X: np.ndarray = base[rng.integers(len(base), size=rows)] + noise
            if step % 7 == 0:
                X = rng.uniform(0, 16, size=(rows, 64))
            fps, keys, _ = trackers.request_hashes(X)
            dens = None if step % 5 == 0 else rng.choice([0.0, 0.0, 0.01, 0.3], size=rows)
            session = f"s{int(rng.integers(6))}"
            assert fast.observe(session, fps, keys, now, dens) == ref.observe(session, fps, keys, now, dens)
            answers = rng.integers(0, 2, size=fps.shape[0])  # clusters answered with one class or two
            fast.learn(fps, answers, now)
            ref.learn(fps, answers, now)
            now += float(rng.choice([0.1, 0.5, 3.0]))
        assert ref._fps is not None and fast._fps is not None
        answered = fast._label >= 0
        assert (fast._flips[answered] > 0).any() and not (fast._flips[answered] > 0).all()
        for name in ("_fps", "_table", "_bucket_head", "_session", "_time", "_weight", "_bin_count", "_bin_id",
                     "_digest_ring", "_label", "_same", "_flips"):
            assert np.array_equal(getattr(fast, name), getattr(ref, name)), name
        assert fast._digests == ref._digests


class TestUpdateInputs:
    def test_passing_the_request_hashes_changes_nothing(self, trackers: SessionTrackers, digits: Digits) -> None:
        """update with request_hashes' fingerprints and digests passed equals update computing them, for 1-row,
        small and over-long (sub-sampled) requests."""
        rng = np.random.default_rng(10)
        a = b = trackers.new_state()
        for step, rows in enumerate((1, 3, 1, 100, 1, 8, 9, 70, 1)):
            X = digits.X_held[rng.integers(len(digits.X_held), size=rows)]
            proba = digits.model.predict_proba(X)
            fps, _, dig = trackers.request_hashes(X)
            a, sa = trackers.update(a, X, None, proba, float(step), global_fingerprint=0.9)
            b, sb = trackers.update(b, X, None, proba, float(step), global_fingerprint=0.9, fingerprints=fps,
                                    digests=dig)
            assert sa == sb and trackers.encode(a) == trackers.encode(b)
        with pytest.raises(ValueError, match="digests"):
            trackers.update(a, X, None, None, 20.0, digests=dig[:0])

    def test_state_copy_is_deep(self, trackers: SessionTrackers, digits: Digits) -> None:
        """The written-out copy shares no array with the original and encodes the same."""
        state, _ = trackers.update(trackers.new_state(), digits.X_held[:5], None, None, 1.0)
        copy = state.copy()
        assert trackers.encode(copy) == trackers.encode(state)
        for name in ("exact", "fp", "nn", "prada_vec", "prada_cls", "cls_stats", "pool", "cells"):
            assert not np.shares_memory(getattr(copy, name), getattr(state, name))



def test_one_row_margin_equals_the_sorted_one() -> None:
    """A one-row answer's margin (top-1 minus top-2, taken on Python floats) is the batch formula's, bit for bit."""
    rng = np.random.default_rng(12)
    for k in (2, 3, 10):
        for _ in range(200):
            p = rng.dirichlet(np.ones(k))[None]
            if rng.random() < 0.2:
                p[0, 1] = p[0, 0]  # ties
            top = np.sort(p, axis=1)[:, -2:]
            got = SessionTrackers._margins(p, 1)
            assert got is not None and got.tolist() == (top[:, 1] - top[:, 0]).tolist()
