"""TrackerConfig: everything the trackers learned from reference data, frozen and serialisable.

Arrays go to the profile's ``.npz`` (loaded with ``allow_pickle=False``), scalars to ``profile.json``.
Fields that only shape the per-session state (ring sizes) are part of the config too, so an encoded
state can only be decoded by trackers with the same layout.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

_ARRAY_FIELDS = ("center", "scale", "components", "whiten", "grid_edges", "cell_probs", "quant_step",
                 "quant_offsets", "prada_proj", "ref_rows", "feature_range", "integer_features")
# arrays a profile written before they existed lacks: rebuilt empty (the feature they serve is then off)
_OPTIONAL_ARRAYS = frozenset({"ref_rows", "feature_range", "integer_features"})


@dataclass(frozen=True, eq=False)
class TrackerConfig:
    """Fitted projection, grid, quantisation and thresholds for every session tracker.

    Projection: rows are standardised (``center``/``scale``), projected on ``components`` (PCA rows in
    standardised space) and whitened (``whiten``); neighbour distances and the coverage grid live in
    that space. PRADA needs distances close to input-space L2, so it uses ``(x - center) @ prada_proj``
    (a Johnson-Lindenstrauss random projection, with features of unusually large spread scaled down).
    """

    n_features: int
    center: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    whiten: np.ndarray
    grid_edges: np.ndarray
    cell_probs: np.ndarray
    quant_step: np.ndarray
    quant_offsets: np.ndarray
    prada_proj: np.ndarray
    # a sample of reference rows: the global fingerprint index discounts near-duplicates in regions where
    # benign inputs are dense (their fingerprints depend on the secret salt, so rows are stored, not hashes)
    ref_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    # max - min of every feature over the reference (empty: unknown, and the gradient-step test is off)
    feature_range: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    # 1 for every feature whose reference values are all whole numbers (codes, counts, levels), else 0 (empty:
    # unknown, and the lattice test of ``_lattice`` is off)
    integer_features: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    residual_threshold: float = math.inf
    norm_threshold: float = math.inf
    rare_cell_prob: float = 0.0
    p0_rare: float = 0.0
    window: int = 8
    n_hashes: int = 20
    match_fraction: float = 0.5
    nn_k: int = 4
    nn_threshold: float = 0.0
    p0_near: float = 0.05
    prada_delta: float = 0.9
    prada_min_threshold: float = 0.0
    prada_min_pool: int = 100
    prada_every: int = 10
    margin_threshold: float = 0.2
    p0_margin: float = 0.2
    half_life: float = 3600.0
    rate_leak: float = 2.0
    rate_half: float = 500.0
    n_class_slots: int = 16
    ring_exact: int = 8
    ring_fp: int = 24
    ring_nn: int = 32
    ring_prada: int = 32
    ring_pool: int = 128
    ring_steps: int = 16
    max_rows_tracked: int = 64
    fitted: bool = False

    def __post_init__(self) -> None:
        """Validate shapes once and make arrays read-only, so a config can be shared freely."""
        d, p = self.n_features, self.components.shape[0]
        if d < 1 or self.center.shape != (d,) or self.scale.shape != (d,) or self.quant_step.shape != (d,):
            raise ValueError("center/scale/quant_step must have shape (n_features,)")
        if self.components.shape != (p, d) or self.whiten.shape != (p,) or p < 1:
            raise ValueError("components must be (p, n_features) and whiten (p,)")
        if self.quant_offsets.ndim != 2 or self.quant_offsets.shape[1] != d or self.quant_offsets.shape[0] < 1:
            raise ValueError("quant_offsets must be (grids, n_features)")
        if self.prada_proj.ndim != 2 or self.prada_proj.shape[0] != d or not 1 <= self.prada_proj.shape[1] <= 256:
            raise ValueError("prada_proj must be (n_features, k) with 1 <= k <= 256")
        if self.ref_rows.size == 0:
            object.__setattr__(self, "ref_rows", np.zeros((0, d)))
        if self.ref_rows.ndim != 2 or self.ref_rows.shape[1] != d:
            raise ValueError("ref_rows must be (rows, n_features)")
        if self.feature_range.shape not in ((0,), (d,)) or np.any(np.asarray(self.feature_range) < 0):
            raise ValueError("feature_range must be empty or (n_features,) and non-negative")
        if self.integer_features.shape not in ((0,), (d,)) or not np.isin(self.integer_features, (0, 1)).all():
            raise ValueError("integer_features must be empty or (n_features,) of 0 and 1")
        g = self.grid_edges.shape[0]
        if self.grid_edges.ndim != 2 or g > p or self.cell_probs.shape != (self.n_cells,):
            raise ValueError("grid_edges must be (g<=p, bins-1) and cell_probs (bins**g,)")
        if not 1 <= self.window <= d or not 1 <= self.n_hashes <= 256:
            raise ValueError("window must be in [1, n_features] and n_hashes in [1, 256]")
        if not 0.0 < self.match_fraction <= 1.0 or np.any(self.scale <= 0) or np.any(self.quant_step <= 0):
            raise ValueError("match_fraction in (0, 1]; scale and quant_step must be positive")
        for name in ("ring_exact", "ring_fp", "ring_nn", "ring_prada", "ring_pool", "ring_steps", "n_class_slots",
                     "nn_k", "max_rows_tracked"):
            if not 1 <= int(getattr(self, name)) <= 4096:
                raise ValueError(f"{name} must be in [1, 4096]")
        for name in _ARRAY_FIELDS:
            arr = np.array(getattr(self, name), dtype=np.float64, copy=True)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} must be finite")
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    @property
    def n_components(self) -> int:
        """Dimension of the whitened projection."""
        return int(self.components.shape[0])

    @property
    def prada_dim(self) -> int:
        """Dimension of PRADA's distance space."""
        return int(self.prada_proj.shape[1])

    @property
    def n_grids(self) -> int:
        """Number of dithered quantisation grids used by the fingerprints."""
        return int(self.quant_offsets.shape[0])

    @property
    def n_cells(self) -> int:
        """Number of coverage-grid cells (the off-manifold cell is extra)."""
        g, b = self.grid_edges.shape
        return int((b + 1) ** g) if g else 1

    @property
    def match_count(self) -> int:
        """Shared hashes needed for two fingerprints to be near-duplicates."""
        return max(1, math.ceil(self.match_fraction * self.n_hashes))

    @functools.cached_property
    def layout_id(self) -> int:
        """32-bit tag of everything that shapes the encoded state, and of the input width (two widths are two
        input spaces: their histories must not mix); decode refuses a mismatch (computed once: it is read on
        every request)."""
        parts = (self.n_components, self.prada_dim, self.n_hashes, self.n_class_slots, self.ring_exact, self.ring_fp,
                 self.ring_nn, self.ring_prada, self.ring_pool, self.n_cells, self.n_features, self.ring_steps)
        return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able parameters and named arrays, for the profile."""
        params: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            if f.name in _ARRAY_FIELDS:
                continue
            v = getattr(self, f.name)
            params[f.name] = ("inf" if v == math.inf else v) if isinstance(v, float) else v
        arrays = {name: np.array(getattr(self, name)) for name in _ARRAY_FIELDS}
        return params, arrays

    @classmethod
    def from_parts(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TrackerConfig:
        """Rebuild a config from :meth:`to_parts` output; raises ValueError on anything inconsistent."""
        if params.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported tracker schema_version {params.get('schema_version')!r}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in _ARRAY_FIELDS:
                if f.name not in arrays and f.name in _OPTIONAL_ARRAYS:
                    continue
                if f.name not in arrays:
                    raise ValueError(f"missing tracker array {f.name!r}")
                arr = np.asarray(arrays[f.name])
                if arr.dtype.kind not in "fiu":
                    raise ValueError(f"tracker array {f.name!r} must be numeric")
                kwargs[f.name] = arr.astype(np.float64)
            elif f.name in params:
                v = params[f.name]
                if f.type in ("int", int):
                    if isinstance(v, bool) or not isinstance(v, int):
                        raise ValueError(f"tracker parameter {f.name!r} must be an integer")
                elif f.type in ("float", float):
                    v = math.inf if v == "inf" else v
                    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                        raise ValueError(f"tracker parameter {f.name!r} must be a number")
                    v = float(v)
                elif f.type in ("bool", bool) and not isinstance(v, bool):
                    raise ValueError(f"tracker parameter {f.name!r} must be a boolean")
                kwargs[f.name] = v
            elif f.default is dataclasses.MISSING:
                raise ValueError(f"missing tracker parameter {f.name!r}")
        return cls(**kwargs)

    @classmethod
    def default(cls, n_features: int) -> TrackerConfig:
        """A config for use without reference data.

        Limits: features are assumed to be roughly unit-scale (standardised, or pixels in [0, 1]); the
        projection is a fixed random orthonormal one, not PCA; no off-manifold test, no coverage grid
        (``session.coverage`` stays 0) and no neighbour threshold (``session.neighbors`` stays 0);
        PRADA uses the paper's fixed delta. Fingerprints, margin, rate and risk work as usual.
        """
        if n_features < 1:
            raise ValueError("n_features must be >= 1")
        d = int(n_features)
        p = min(8, d)
        rng = np.random.default_rng(0)
        q, _ = np.linalg.qr(rng.standard_normal((d, p)))
        window = _default_window(d)
        grids = _grids_for(d, window, 20)
        return cls(
            n_features=d,
            center=np.zeros(d),
            scale=np.ones(d),
            components=q.T.copy(),
            whiten=np.ones(p),
            grid_edges=np.zeros((0, 3)),
            cell_probs=np.ones(1),
            quant_step=np.full(d, 0.1),
            quant_offsets=rng.uniform(0.0, 1.0, size=(grids, d)),
            prada_proj=prada_projection(np.ones(d), rng),
            window=window,
            fitted=False,
        )


def _default_window(d: int) -> int:
    """Blacklight-style windows for long vectors; one whole-row window for short ones."""
    return d if d < 16 else int(min(16, max(4, d // 16)))


def _grids_for(d: int, window: int, n_hashes: int) -> int:
    """Enough dithered grids that a row yields at least ``n_hashes`` window hashes."""
    return int(max(1, math.ceil(n_hashes / (d - window + 1))))


def prada_projection(scale: np.ndarray, rng: np.random.Generator, k_max: int = 24) -> np.ndarray:
    """(d, k) map for PRADA: divide by ``scale``, then a Gaussian JL projection when d > k_max."""
    d = scale.shape[0]
    if d <= k_max:
        out: np.ndarray = np.diag(1.0 / scale)
    else:
        out = (rng.standard_normal((d, k_max)) / np.sqrt(k_max)) / scale[:, None]
    return out
