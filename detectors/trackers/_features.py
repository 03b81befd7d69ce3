"""Per-row quantities every tracker shares: whitened projection, off-manifold test and grid cell."""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from ._config import TrackerConfig

_U_CLIP = 6.0e4
_FEW_ROWS = 8


@dataclass(frozen=True)
class RowFeatures:
    """Projection of a batch: z (rows, p) whitened; u (rows, k) PRADA coordinates; cell (rows,) grid
    cell, or n_cells when off-manifold; rare (rows,) off-manifold or in a cell the reference hardly visits."""

    z: np.ndarray
    u: np.ndarray
    cell: np.ndarray
    rare: np.ndarray


class Projector:
    """:func:`project` for one config, with its constants read once (a request has one row or a few, so
    per-call overhead, not arithmetic, is the cost). Results are bit-identical to the plain formulas: every
    floating-point operation is the same numpy call on the same shapes."""

    def __init__(self, cfg: TrackerConfig) -> None:
        self.cfg = cfg
        self._center, self._scale, self._whiten = cfg.center, cfg.scale, cfg.whiten
        self._comp, self._comp_t, self._prada = cfg.components, cfg.components.T, cfg.prada_proj
        self._d, self._p = float(cfg.n_features), float(cfg.n_components)
        self._resid_t, self._norm_t = cfg.residual_threshold, cfg.norm_threshold
        self._n_cells, self._rare_p = cfg.n_cells, cfg.rare_cell_prob
        self._edges = [row.tolist() for row in cfg.grid_edges]  # bisect_right == searchsorted(side="right")
        self._base = cfg.grid_edges.shape[1] + 1
        self._cell_probs = cfg.cell_probs.tolist()
        # with both thresholds +inf (the default config) no value exceeds them, NaN included
        self._off_test = not (cfg.residual_threshold == math.inf and cfg.norm_threshold == math.inf)

    def __call__(self, X: np.ndarray) -> RowFeatures:
        """Whitened PCA coordinates, grid cell and rare-region flag for every row of 2-D float64 ``X``."""
        if X.shape[0] <= _FEW_ROWS:
            z, u, cells, rares = self.rows(X)
            return RowFeatures(z=z, u=u, cell=np.array(cells, dtype=np.int64), rare=np.array(rares, dtype=bool))
        xc = X - self._center
        xs = xc / self._scale
        coef = xs @ self._comp_t
        z = coef * self._whiten
        r = xs - coef @ self._comp
        r *= r
        resid = np.add.reduce(r, axis=1) / self._d  # == np.mean(r ** 2, axis=1)
        norm2 = np.add.reduce(z * z, axis=1) / self._p
        off = (resid > self._resid_t) | (norm2 > self._norm_t)
        u = self._prada_coords(xc)
        cfg = self.cfg
        cell = np.zeros(X.shape[0], dtype=np.int64)
        for j in range(len(self._edges)):
            cell = cell * self._base + np.searchsorted(cfg.grid_edges[j], z[:, j], side="right")
        rare_cell = cfg.cell_probs[cell] < self._rare_p
        cell = np.where(off, self._n_cells, cell)
        return RowFeatures(z=z, u=u, cell=cell, rare=off | rare_cell)

    def rows(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int], list[bool]]:
        """``(z, u, cells, rares)`` as in :meth:`__call__`, cells and flags as Python lists, with the
        per-row decisions taken on Python floats (a request of a few rows: fewer numpy calls)."""
        xc = X - self._center
        xs = xc / self._scale
        coef = xs @ self._comp_t
        z = coef * self._whiten
        if self._off_test:
            r = xs - coef @ self._comp
            r *= r
            resid = (np.add.reduce(r, axis=1) / self._d).tolist()  # == np.mean(r ** 2, axis=1)
            norm2 = (np.add.reduce(z * z, axis=1) / self._p).tolist()
            off = [a > self._resid_t or b > self._norm_t for a, b in zip(resid, norm2, strict=True)]
        else:
            off = [False] * X.shape[0]
        u = self._prada_coords(xc)
        g = len(self._edges)
        cells: list[int] = []
        rares: list[bool] = []
        lead = z[:, :g].tolist()
        for zr, o in zip(lead, off, strict=True):
            c = 0
            for j in range(g):
                c = c * self._base + bisect_right(self._edges[j], zr[j])
            rares.append(o or self._cell_probs[c] < self._rare_p)
            cells.append(self._n_cells if o else c)
        return z, u, cells, rares

    def _prada_coords(self, xc: np.ndarray) -> np.ndarray:
        u: np.ndarray = xc @ self._prada
        np.maximum(u, -_U_CLIP, out=u)
        np.minimum(u, _U_CLIP, out=u)  # == np.clip(u, -6e4, 6e4)
        return u


def standardise(cfg: TrackerConfig, X: np.ndarray) -> np.ndarray:
    """(X - center) / scale."""
    out: np.ndarray = (X - cfg.center) / cfg.scale
    return out


def project(cfg: TrackerConfig, X: np.ndarray) -> RowFeatures:
    """Whitened PCA coordinates, grid cell and rare-region flag for every row."""
    return Projector(cfg)(np.asarray(X, dtype=np.float64))


def residual_and_norm(cfg: TrackerConfig, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared PCA residual and mean squared whitened norm per row (used by the fit)."""
    xs = standardise(cfg, X)
    coef = xs @ cfg.components.T
    return np.mean((xs - coef @ cfg.components) ** 2, axis=1), np.mean((coef * cfg.whiten) ** 2, axis=1)
