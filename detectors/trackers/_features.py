"""Per-row quantities every tracker shares: whitened projection, off-manifold test and grid cell."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._config import TrackerConfig


@dataclass(frozen=True)
class RowFeatures:
    """Projection of a batch: z (rows, p) whitened; u (rows, k) PRADA coordinates; cell (rows,) grid
    cell, or n_cells when off-manifold; rare (rows,) off-manifold or in a cell the reference hardly visits."""

    z: np.ndarray
    u: np.ndarray
    cell: np.ndarray
    rare: np.ndarray


def standardise(cfg: TrackerConfig, X: np.ndarray) -> np.ndarray:
    """(X - center) / scale."""
    out: np.ndarray = (X - cfg.center) / cfg.scale
    return out


def project(cfg: TrackerConfig, X: np.ndarray) -> RowFeatures:
    """Whitened PCA coordinates, grid cell and rare-region flag for every row."""
    xs = standardise(cfg, X)
    coef = xs @ cfg.components.T
    z = coef * cfg.whiten
    resid = np.mean((xs - coef @ cfg.components) ** 2, axis=1)
    norm2 = np.mean(z**2, axis=1)
    off = (resid > cfg.residual_threshold) | (norm2 > cfg.norm_threshold)
    g, _ = cfg.grid_edges.shape
    cell = np.zeros(X.shape[0], dtype=np.int64)
    base = cfg.grid_edges.shape[1] + 1
    for j in range(g):
        cell = cell * base + np.searchsorted(cfg.grid_edges[j], z[:, j], side="right")
    rare_cell = cfg.cell_probs[cell] < cfg.rare_cell_prob
    cell = np.where(off, cfg.n_cells, cell)
    u = np.clip((X - cfg.center) @ cfg.prada_proj, -6.0e4, 6.0e4)
    return RowFeatures(z=z, u=u, cell=cell, rare=off | rare_cell)


def residual_and_norm(cfg: TrackerConfig, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared PCA residual and mean squared whitened norm per row (used by the fit)."""
    xs = standardise(cfg, X)
    coef = xs @ cfg.components.T
    return np.mean((xs - coef @ cfg.components) ** 2, axis=1), np.mean((coef * cfg.whiten) ** 2, axis=1)
