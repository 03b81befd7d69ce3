"""Lattice test: does a query leave the whole numbers its reference's integer-coded features always took?

Tabular references often code categories, levels, counts and flags as whole numbers; every benign row of such
data is whole there. A black-box search moves in continuous space (HopSkipJump's and Boundary's probes, a
uniform draw over the box), so its queries are fractional on nearly every such feature at once, while the
reference manifold's own tests (PCA residual, whitened norm) see a point between lattice nodes as ordinary.
The test fires when at least half of the integer-coded features (and at least ``_MIN_FRACTIONAL``) carry a
fraction; a client editing one to three values by hand, or a source that rounds differently on a feature or
two, does not. It needs ``_MIN_INTEGER`` integer-coded features (fewer: off), and a profile fitted before the
test existed has none recorded (off).

A hit marks the query as off the reference manifold for the neighbour tracker: close neighbours off the
manifold are evidence of a search, as for synthetic perturbations (``SessionTrackers._neighbor_step``).
"""

from __future__ import annotations

import math

import numpy as np

from ._config import TrackerConfig

_MIN_INTEGER = 4
_MIN_FRACTIONAL = 3
_SHARE = 0.5


class LatticeTest:
    """The test for one config (its integer-coded features found once)."""

    def __init__(self, cfg: TrackerConfig) -> None:
        mask = cfg.integer_features.astype(bool) if cfg.integer_features.shape == (cfg.n_features,) else None
        self._columns = np.flatnonzero(mask) if mask is not None else np.zeros(0, dtype=np.int64)
        self.active = self._columns.size >= _MIN_INTEGER
        self._need = max(_MIN_FRACTIONAL, math.ceil(_SHARE * self._columns.size))

    def off(self, X: np.ndarray) -> list[bool]:
        """Per row of ``X``: fractional on at least half of the integer-coded features (all False when off)."""
        if not self.active:
            return [False] * X.shape[0]
        coded = X[:, self._columns]
        fractional = np.add.reduce(coded != np.round(coded), axis=1)
        out: list[bool] = (fractional >= self._need).tolist()
        return out
