"""SessionState: the bounded, serialisable per-session memory of every tracker, and its byte codec.

All arrays have a fixed shape given by the config (ring buffers plus fill counters), so a session's
size never grows: with the fitted defaults (8 projected dims, 20 hashes, 10-16 classes) it is about
6 KiB encoded (6,213 bytes for a digits profile fitted on 1,200 rows, of which 224 are the answered class of
each fingerprint and neighbour ring entry and 2,048 the last 16 distinct inputs of the gradient-step
test). The codec is a fixed little-endian layout (struct header + raw arrays), no pickle; decode checks
magic, version, layout tag, exact length and value ranges and raises ValueError.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._config import TrackerConfig

_MAGIC = b"IGS1"
_VERSION = 3  # 3: the ring of recent standardised inputs (steps) for the gradient-step test
_INTS = ("n_queries", "n_repeats", "n_distinct", "n_exact", "head_exact", "n_fp", "head_fp", "n_nn",
         "head_nn", "n_prada", "head_prada", "n_pool", "head_pool", "n_pool_total", "n_steps", "head_steps")
_FLOATS = ("first_t", "last_t", "rate_level", "s_fingerprint", "s_neighbors", "s_coverage", "s_margin",
           "s_prada", "s_global", "s_joint", "last_w", "visited_mass")
_HEADER = struct.Struct("<4sHHI" + "q" * len(_INTS) + "d" * len(_FLOATS))


@dataclass(eq=False, slots=True)
class SessionState:
    """One session's tracker memory. Treat as a value: SessionTrackers.update returns a new one.

    Slotted: 100k idle sessions each hold one, and a per-instance ``__dict__`` of 34 fields was ~1.6 KB of
    every session's ~9 KB in memory."""

    n_queries: int
    n_repeats: int
    n_distinct: int
    n_exact: int
    head_exact: int
    n_fp: int
    head_fp: int
    n_nn: int
    head_nn: int
    n_prada: int
    head_prada: int
    n_pool: int
    head_pool: int
    n_pool_total: int
    n_steps: int
    head_steps: int
    first_t: float
    last_t: float
    rate_level: float
    s_fingerprint: float
    s_neighbors: float
    s_coverage: float
    s_margin: float
    s_prada: float
    s_global: float
    s_joint: float
    last_w: float
    visited_mass: float
    exact: np.ndarray  # (ring_exact,) uint64 digests of recent distinct rows
    fp: np.ndarray  # (ring_fp, n_hashes) uint16 compact fingerprints
    fp_cls: np.ndarray  # (ring_fp,) int32 class slot answered for each stored fingerprint
    nn: np.ndarray  # (ring_nn, p) float16 projected recent queries
    nn_cls: np.ndarray  # (ring_nn,) int32 class slot answered for each of them
    prada_vec: np.ndarray  # (ring_prada, prada_dim) float16 PRADA growing sets (all classes, FIFO)
    prada_cls: np.ndarray  # (ring_prada,) int32 class slot of each growing-set vector
    cls_stats: np.ndarray  # (n_class_slots, 3) float64 count, sum, sum of squares of accepted distances
    pool: np.ndarray  # (ring_pool,) float16 recent PRADA minimum distances
    cells: np.ndarray  # (ceil((n_cells + 1) / 8),) uint8 visited-cell bitset (last bit = off-manifold)
    steps: np.ndarray  # (ring_steps, n_features) float16 recent distinct inputs, standardised

    def copy(self) -> SessionState:
        """Deep copy (arrays included). Written out field by field rather than ``dataclasses.replace`` (which
        re-runs ``__init__`` through keyword arguments) or a loop over names (setattr by name is twice as
        slow on slots): this runs on every request. tests/trackers/test_state.py checks it copies every field."""
        new = object.__new__(SessionState)
        new.n_queries, new.n_repeats, new.n_distinct = self.n_queries, self.n_repeats, self.n_distinct
        new.n_exact, new.head_exact, new.n_fp = self.n_exact, self.head_exact, self.n_fp
        new.head_fp, new.n_nn, new.head_nn = self.head_fp, self.n_nn, self.head_nn
        new.n_prada, new.head_prada, new.n_pool = self.n_prada, self.head_prada, self.n_pool
        new.head_pool, new.n_pool_total = self.head_pool, self.n_pool_total
        new.n_steps, new.head_steps = self.n_steps, self.head_steps
        new.first_t, new.last_t, new.rate_level = self.first_t, self.last_t, self.rate_level
        new.s_fingerprint, new.s_neighbors, new.s_coverage = self.s_fingerprint, self.s_neighbors, self.s_coverage
        new.s_margin, new.s_prada, new.s_global = self.s_margin, self.s_prada, self.s_global
        new.s_joint, new.last_w, new.visited_mass = self.s_joint, self.last_w, self.visited_mass
        new.exact, new.fp, new.nn = self.exact.copy(), self.fp.copy(), self.nn.copy()
        new.fp_cls, new.nn_cls = self.fp_cls.copy(), self.nn_cls.copy()
        new.prada_vec, new.prada_cls = self.prada_vec.copy(), self.prada_cls.copy()
        new.cls_stats, new.pool, new.cells = self.cls_stats.copy(), self.pool.copy(), self.cells.copy()
        new.steps = self.steps.copy()
        return new




def array_layout(cfg: TrackerConfig) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, little-endian dtype) of every state array for this config, in encoding order."""
    p = cfg.n_components
    return (
        ("exact", (cfg.ring_exact,), "<u8"),
        ("fp", (cfg.ring_fp, cfg.n_hashes), "<u2"),
        ("fp_cls", (cfg.ring_fp,), "<i4"),
        ("nn", (cfg.ring_nn, p), "<f2"),
        ("nn_cls", (cfg.ring_nn,), "<i4"),
        ("prada_vec", (cfg.ring_prada, cfg.prada_dim), "<f2"),
        ("prada_cls", (cfg.ring_prada,), "<i4"),
        ("cls_stats", (cfg.n_class_slots, 3), "<f8"),
        ("pool", (cfg.ring_pool,), "<f2"),
        ("cells", ((cfg.n_cells + 1 + 7) // 8,), "u1"),
        ("steps", (cfg.ring_steps, cfg.n_features), "<f2"),
    )


def new_state(cfg: TrackerConfig) -> SessionState:
    """An empty session."""
    arrays: dict[str, Any] = {
        name: np.zeros(shape, dtype=np.dtype(dt).newbyteorder("=")) for name, shape, dt in array_layout(cfg)
    }
    ints: dict[str, Any] = dict.fromkeys(_INTS, 0)
    floats: dict[str, Any] = dict.fromkeys(_FLOATS, 0.0)
    floats["first_t"] = math.nan
    floats["last_t"] = math.nan
    floats["last_w"] = 1.0
    return SessionState(**ints, **floats, **arrays)


def encoded_size(cfg: TrackerConfig) -> int:
    """Exact byte length of an encoded state for this config."""
    return _HEADER.size + sum(int(np.prod(s)) * np.dtype(dt).itemsize for _, s, dt in array_layout(cfg))


def encode(cfg: TrackerConfig, state: SessionState) -> bytes:
    """Fixed-layout little-endian bytes."""
    head = _HEADER.pack(_MAGIC, _VERSION, 0, cfg.layout_id, *(int(getattr(state, n)) for n in _INTS),
                        *(float(getattr(state, n)) for n in _FLOATS))
    body = [np.ascontiguousarray(getattr(state, name), dtype=dt).tobytes() for name, _, dt in array_layout(cfg)]
    return head + b"".join(body)


def decode(cfg: TrackerConfig, data: bytes) -> SessionState:
    """Strict inverse of :func:`encode`: ValueError on any mismatch or out-of-range value."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError("state must be bytes")
    data = bytes(data)
    if len(data) != encoded_size(cfg):
        raise ValueError(f"state has {len(data)} bytes, expected {encoded_size(cfg)}")
    fields = _HEADER.unpack_from(data, 0)
    magic, version, _reserved, layout = fields[:4]
    if magic != _MAGIC or version != _VERSION or layout != cfg.layout_id:
        raise ValueError("not a session state of this tracker layout")
    ints: dict[str, Any] = dict(zip(_INTS, fields[4 : 4 + len(_INTS)], strict=True))
    floats: dict[str, Any] = dict(zip(_FLOATS, fields[4 + len(_INTS) :], strict=True))
    arrays: dict[str, Any] = {}
    off = _HEADER.size
    for name, shape, dt in array_layout(cfg):
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        arrays[name] = np.frombuffer(data, dtype=dt, count=int(np.prod(shape)), offset=off).reshape(shape).astype(
            np.dtype(dt).newbyteorder("="))
        off += n
    _validate(cfg, ints, floats, arrays)
    return SessionState(**ints, **floats, **arrays)


def _validate(cfg: TrackerConfig, ints: dict[str, Any], floats: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Range checks so a forged or corrupted state cannot index out of bounds or poison scores."""
    caps = {"exact": cfg.ring_exact, "fp": cfg.ring_fp, "nn": cfg.ring_nn, "prada": cfg.ring_prada,
            "pool": cfg.ring_pool, "steps": cfg.ring_steps}
    for key, cap in caps.items():
        if not (0 <= ints[f"n_{key}"] <= cap and 0 <= ints[f"head_{key}"] < cap):
            raise ValueError(f"state ring {key!r} counters out of range")
    if min(ints["n_queries"], ints["n_repeats"], ints["n_distinct"], ints["n_pool_total"]) < 0:
        raise ValueError("state counters must be non-negative")
    if ints["n_repeats"] + ints["n_distinct"] != ints["n_queries"]:
        raise ValueError("state counters are inconsistent")
    for name in _FLOATS:
        if name in ("first_t", "last_t", "last_w", "visited_mass"):
            continue
        v = floats[name]
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"state field {name!r} must be finite and >= 0")
    if not (0.0 <= floats["last_w"] <= 1.0 and 0.0 <= floats["visited_mass"] <= 1.0 + 1e-9):
        raise ValueError("state W / visited mass out of range")
    for name in ("first_t", "last_t"):
        if math.isinf(floats[name]):
            raise ValueError(f"state field {name!r} must not be infinite")
    for name in ("nn", "prada_vec", "cls_stats", "pool", "steps"):
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(f"state array {name!r} must be finite")
    for name in ("prada_cls", "fp_cls", "nn_cls"):
        if np.any(arrays[name] < 0) or np.any(arrays[name] >= cfg.n_class_slots):
            raise ValueError("state class slots out of range")
    if np.any(arrays["cls_stats"][:, 0] < 0):
        raise ValueError("state class counts must be non-negative")
