"""fit_tracker_config: learn projection, grid, quantisation and thresholds from reference data.

The reference rows are split (by ``seed``) into a fit part (60 %) and a calibration part (40 %) that
the fit never saw. Projection, grid and quantiles come from the fit part; every benign rate and
threshold the sequential tests rely on is measured on shuffled benign streams drawn from the
calibration part, at a target of 1 % per query (0.5 % for the off-manifold quantiles); the
rare-region rate is doubled to leave room for drift in live traffic.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _hashing, _prada
from ._config import TrackerConfig, _default_window, _grids_for, prada_projection
from ._features import project, residual_and_norm
from ._state import new_state

_ALPHAS = tuple(float(2.0 ** (1 - k / 2)) for k in range(11))  # 2 down to 1/16 in sqrt(2) steps
_TARGET = 0.01
_STREAM = 600
_BINS = 4
_REF_ROWS, _REF_BYTES = 2048, 2 << 20  # reference sample for the global index's density discount


def fit_tracker_config(X: np.ndarray, labels: np.ndarray | None = None, *, seed: int = 0) -> TrackerConfig:
    """Fit every tracker's parameters on reference rows ``X`` (rows, features); ``labels`` are optional
    class ids of those rows (true or predicted), used to calibrate PRADA per class."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim > 2:
        X = X.reshape(X.shape[0], -1)
    if X.ndim != 2 or X.shape[0] < 20 or X.shape[1] < 1:
        raise ValueError("reference data must be 2-D with at least 20 rows")
    if not np.all(np.isfinite(X)):
        raise ValueError("reference data must be finite")
    lab = _labels(labels, X.shape[0])
    n, d = X.shape
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if n >= 100:
        cut = int(0.6 * n)
        fi, ci = perm[:cut], perm[cut:]
    else:
        fi = ci = perm
    Xf, Xc, yc = X[fi], X[ci], lab[ci]

    std = Xf.std(axis=0)
    pos = std[std > 0]
    p = int(min(8, d, Xf.shape[0] - 1))
    center, scale, comps, whiten = _pca(Xf, p)
    xs = (Xf - center) / scale
    g = int(min(4, p, max(1, np.floor(np.log(max(Xf.shape[0], 40) / 10) / np.log(_BINS)))))
    n_slots = _class_slots(labels, lab)
    window = _default_window(d)
    grids = _grids_for(d, window, 20)
    offsets = rng.uniform(0.0, 1.0, size=(grids, d))
    cfg = TrackerConfig(
        n_features=d, center=center, scale=scale, components=comps, whiten=whiten,
        grid_edges=np.zeros((0, _BINS - 1)), cell_probs=np.ones(1), quant_step=scale.copy(),
        quant_offsets=offsets, prada_proj=prada_projection(np.maximum(std, float(np.median(pos)) if pos.size else 1.0),
                                                             rng), window=window, n_class_slots=n_slots, fitted=True,
    )
    resid, norm2 = _out_of_sample_residuals(cfg, Xf, Xc if ci is not fi else None)
    zf = (xs @ comps.T) * whiten
    edges = np.quantile(zf[:, :g], [0.25, 0.5, 0.75], axis=0).T if g else np.zeros((0, _BINS - 1))
    cfg = dataclasses.replace(
        cfg, grid_edges=edges, cell_probs=np.ones(_BINS**g), residual_threshold=float(np.quantile(resid, 0.995)),
        norm_threshold=float(np.quantile(norm2, 0.995)))
    counts = np.bincount(project(cfg, Xf).cell, minlength=cfg.n_cells + 1)[: cfg.n_cells]
    probs = (counts + 0.5) / (counts.sum() + 0.5 * cfg.n_cells)
    cfg = dataclasses.replace(cfg, cell_probs=probs, rare_cell_prob=0.25 / cfg.n_cells)
    # doubled: live benign traffic drifts (shifted, noisy, edited inputs) beyond the held-out rate
    p0_rare = min(0.25, max(0.01, 2.0 * float(project(cfg, Xc).rare.mean())))
    cfg = dataclasses.replace(cfg, p0_rare=p0_rare)

    order = rng.permutation(Xc.shape[0])[:_STREAM]
    stream, _ = _dedupe(Xc[order], yc[order])
    # one step for all features of ordinary spread (as Blacklight quantises every pixel alike): a
    # per-feature std would make near-constant features (image borders) flip under any perturbation
    unit = np.maximum(std, float(np.median(pos)) if pos.size else 1.0)
    alpha = _fit_alpha(cfg, stream, unit)
    cfg = dataclasses.replace(cfg, quant_step=alpha * unit)
    nn_thr = _fit_nn_threshold(cfg, project(cfg, stream).z)
    cfg = dataclasses.replace(cfg, nn_threshold=nn_thr)
    delta = _fit_prada_delta(cfg, Xc, yc, rng)
    n_ref = int(min(n, _REF_ROWS, max(32, _REF_BYTES // (8 * d))))
    varies = X.max(axis=0) > X.min(axis=0)
    whole = np.all(np.round(X) == X, axis=0) & varies
    return dataclasses.replace(cfg, prada_delta=delta, ref_rows=X[perm[:n_ref]],
                               feature_range=X.max(axis=0) - X.min(axis=0),
                               integer_features=whole.astype(np.uint8))


def _pca(X: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(center, scale, components, whiten) of ``p`` principal components of standardised ``X``; the scale
    has a floor (a tenth of the median spread) so near-constant features do not dominate."""
    center = X.mean(axis=0)
    std = X.std(axis=0)
    pos = std[std > 0]
    scale = np.maximum(std, 0.1 * float(np.median(pos)) if pos.size else 1.0)
    _, s, vt = np.linalg.svd((X - center) / scale, full_matrices=False)
    comps = np.zeros((p, X.shape[1]))
    comps[: min(p, vt.shape[0])] = vt[:p]
    var = np.zeros(p)
    var[: min(p, s.shape[0])] = s[:p] ** 2 / max(1, X.shape[0] - 1)
    whiten = 1.0 / np.sqrt(np.maximum(var, 1e-12 * max(1.0, float(var.max(initial=0.0)))))
    return center, scale, comps, whiten


def _out_of_sample_residuals(cfg: TrackerConfig, Xf: np.ndarray,
                             Xc: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """PCA residuals and whitened norms of every reference row, each from a projection fitted without it:
    ``Xf``'s rows out of fold (5 folds, each refitted as the real projection is), ``Xc``'s (the calibration
    rows, when separate) under the real projection. In-sample residuals are smaller than those of new rows,
    the more so the fewer the rows: a 99.5 % quantile of them put one held-out wine row in 18 (124 reference
    rows) off the manifold, where new benign rows should land one time in 200."""
    p = cfg.n_components
    folds = np.arange(Xf.shape[0]) % 5
    resid, norm = [], []
    for k in range(5):
        train, test = Xf[folds != k], Xf[folds == k]
        if test.shape[0] == 0 or train.shape[0] < 2:
            continue
        center, scale, comps, whiten = _pca(train, p)
        fold = dataclasses.replace(cfg, center=center, scale=scale, components=comps, whiten=whiten)
        r, n2 = residual_and_norm(fold, test)
        resid.append(r)
        norm.append(n2)
    if Xc is not None:
        r, n2 = residual_and_norm(cfg, Xc)
        resid.append(r)
        norm.append(n2)
    return np.concatenate(resid), np.concatenate(norm)


def _labels(labels: np.ndarray | None, n: int) -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError("labels must have one entry per reference row")
    if lab.dtype.kind in "iub":
        return lab.astype(np.int64)
    _, inv = np.unique(lab.astype(str), return_inverse=True)
    return inv.astype(np.int64)


def _class_slots(raw: np.ndarray | None, lab: np.ndarray) -> int:
    """Exact slots for small non-negative integer class ids, else 16 hashed slots."""
    if raw is not None and lab.size and lab.min() >= 0 and lab.max() < 64:
        return int(max(2, lab.max() + 1))
    return 16


def _dedupe(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop exact duplicate rows (the trackers ignore exact repeats too)."""
    _, idx = np.unique(X, axis=0, return_index=True)
    idx = np.sort(idx)
    return X[idx], y[idx]


def _near_dup_rate(cfg: TrackerConfig, stream: np.ndarray, keys: np.ndarray) -> float:
    """Share of benign stream rows that look like near-duplicates of one of the previous ring_fp rows."""
    h = _hashing.window_hashes(stream, cfg.center, cfg.quant_step, cfg.quant_offsets, cfg.window, keys)
    fps = _hashing.compact(_hashing.bottom_k(h, cfg.n_hashes))
    hits = 0
    for i in range(1, fps.shape[0]):
        prev = fps[max(0, i - cfg.ring_fp) : i]
        need = min(cfg.match_count, int(np.count_nonzero(fps[i])))
        hits += int(np.any(_hashing.shared_counts(fps[i], prev) >= need))
    return float(hits / max(1, int(fps.shape[0]) - 1))


def _fit_alpha(cfg: TrackerConfig, stream: np.ndarray, unit: np.ndarray) -> float:
    """Coarsest quantisation step (in feature std units) whose benign near-duplicate rate is <= 1 %."""
    keys = _hashing.derive_keys(b"calibration-only-salt", cfg.n_grids + cfg.window)
    for alpha in _ALPHAS:
        trial = dataclasses.replace(cfg, quant_step=alpha * unit)
        if _near_dup_rate(trial, stream, keys) <= _TARGET:
            return alpha
    return _ALPHAS[-1]


def _fit_nn_threshold(cfg: TrackerConfig, z: np.ndarray) -> float:
    """1 % quantile of the mean k-nearest-neighbour distance over benign streams."""
    k, ring = cfg.nn_k, cfg.ring_nn
    vals = []
    for i in range(k, z.shape[0]):
        prev = z[max(0, i - ring) : i]
        dist = np.sqrt(np.sum((prev - z[i]) ** 2, axis=1))
        vals.append(float(np.mean(np.partition(dist, k - 1)[:k])))
    return float(np.quantile(vals, _TARGET)) if len(vals) >= 20 else 0.0


def _fit_prada_delta(cfg: TrackerConfig, Xc: np.ndarray, yc: np.ndarray, rng: np.random.Generator) -> float:
    """Per-session false-alarm control (the checks of one session are strongly correlated): each of 20
    benign streams of up to 300 queries gives its lowest W; delta = min - (median - min), i.e. the
    observed tail extended by its own width, towards the rarer sessions 20 streams cannot show
    (duplicates, shifted inputs and label noise in live traffic lower W). 0.9 if too little data."""
    u = project(cfg, Xc).u
    length = min(Xc.shape[0], 300)
    if length <= cfg.prada_min_pool + 2 * cfg.prada_every:
        return 0.9
    lows: list[float] = []
    for _ in range(20):
        st = new_state(cfg)
        low = 1.0
        for i in rng.permutation(Xc.shape[0])[:length]:
            w = _prada.step(cfg, st, u[i], _prada.class_slot(cfg, int(yc[i])))
            low = min(low, w) if w is not None else low
        lows.append(low)
    lo, med = float(np.min(lows)), float(np.median(lows))
    return float(max(0.0, 2.0 * lo - med))
