"""Gradient-step test: is a query one of the session's recent queries plus a dense step of one magnitude?

Synthetic extraction (Jacobian-based augmentation, Papernot et al. 2017; its random-sign variant T-RND) and
FGSM-style probing query ``x + lam * sign(g)``: every feature that moves, moves by the same amount (in the
input's units, or as the same share of each feature's range when the attacker scales the step per
feature), on a large part of the features at once. Benign clients edit a few features by varied amounts,
and two distinct natural inputs differ by varied amounts: on the detection matrix's five models, 1,200 benign
sessions of six traffic shapes per model (667,000 queries in all) gave no hit, while Jacobian augmentation hit
from its first augmented query on every model (``bench/detection_matrix.py``; docs/detection.md).

A hit needs, against one of the last ``ring_steps`` distinct queries:

- at least a quarter of the features that vary in the reference moved, and at least ``_MIN_EQUAL``;
- at least half of the moved features (and ``_MIN_EQUAL``) moved by the same amount (within 3 % of the
  largest such move), in input units or in units of each feature's reference range, and by less than half
  of their reference range: a flag flipping between its values, or a code changing by one of its few levels,
  is a categorical edit and never counts as an equal move (integer-coded records differ by one level on many
  features), while a few features of narrow reference range (an image's border pixels) moved that far by a
  real step only count against it.

What it cannot see: steps against a parent older than the ring (an attacker who augments a large seed set,
150 seeds as in the paper, before querying the children); inputs of fewer than ``_MIN_EQUAL`` features;
steps under about a tenth of a feature's spread (the float16 storage's rounding, about 0.002 spreads at
two spreads from the mean, then exceeds the 3 % tolerance).
"""

from __future__ import annotations

import math

import numpy as np

from ._config import TrackerConfig
from ._state import SessionState

_MIN_EQUAL = 5
_MOVED_SHARE = 0.25
_EQUAL_SHARE = 0.5
_EQUAL_TOL = 0.97
_MAX_RANGE_SHARE = 0.5
_F16_MAX = 6.0e4


class StepTest:
    """The test for one config (constants prepared once); :meth:`step` runs it and stores the query."""

    def __init__(self, cfg: TrackerConfig) -> None:
        self.active = cfg.feature_range.shape == (cfg.n_features,) and cfg.n_features >= _MIN_EQUAL
        self._center, self._scale = cfg.center, cfg.scale
        rng = cfg.feature_range if self.active else np.ones(cfg.n_features)
        live = rng > 0
        # per feature: input units per stored (standardised) unit, and range shares per stored unit (0 for a
        # feature constant in the reference: its moves count, but never as a share of its range)
        to_input = np.asarray(cfg.scale, dtype=np.float64)
        to_share = np.where(live, cfg.scale / np.where(live, rng, 1.0), 0.0)
        self._units = np.stack([to_input, to_share])[:, None, None, :]  # (2, 1, 1, features)
        self._need_moved = max(_MIN_EQUAL, math.ceil(_MOVED_SHARE * int(live.sum())))
        self._ring = cfg.ring_steps

    def standardise(self, X: np.ndarray) -> np.ndarray:
        """The rows as stored: standardised, clipped to float16's range, at float16 precision."""
        xs = X - self._center
        xs /= self._scale
        np.maximum(xs, -_F16_MAX, out=xs)
        np.minimum(xs, _F16_MAX, out=xs)  # == np.clip, without its Python wrapper
        out: np.ndarray = xs.astype(np.float16)
        return out

    def step(self, st: SessionState, row16: np.ndarray) -> bool:
        """Whether ``row16`` (one row of :meth:`standardise`) is a gradient step from a stored query; then
        stores it (mutates ``st``)."""
        hit = self.active and st.n_steps > 0 and bool(self.hits(st.steps[None, : st.n_steps], None, row16[None])[0])
        self.store(st, row16)
        return hit

    def store(self, st: SessionState, row16: np.ndarray) -> None:
        """Keep ``row16`` in the session's ring of recent distinct queries (mutates ``st``)."""
        st.steps[st.head_steps] = row16
        st.head_steps = (st.head_steps + 1) % self._ring
        st.n_steps = min(st.n_steps + 1, self._ring)

    def hits(self, stored: np.ndarray, empty: np.ndarray | None, rows16: np.ndarray) -> np.ndarray:
        """The test for several sessions at once: ``stored`` (sessions, ring, features) their rings, ``empty``
        (sessions, ring) their slots holding no query yet (None: all hold one), ``rows16`` (sessions, features)
        one query each. Input units and range shares side by side on the first axis, so each step is one numpy
        call for everything."""
        diff = stored.astype(np.float64)
        diff -= rows16[:, None, :].astype(np.float64)  # float16 both: an unchanged feature differs by exactly 0
        np.abs(diff, out=diff)
        moved = diff > 0.0
        n_moved = np.add.reduce(moved, axis=2)
        units = diff * self._units  # (2, sessions, ring, features): input units, range shares
        small = units[1] < _MAX_RANGE_SHARE  # flags flipping between their values never count as equal
        small &= moved
        units *= small
        top = units.max(axis=3, keepdims=True)
        top *= _EQUAL_TOL
        equal = units >= top
        equal &= small
        need = np.maximum(_EQUAL_SHARE * n_moved, _MIN_EQUAL)
        need[n_moved < self._need_moved] = np.inf
        if empty is not None:
            need[empty] = np.inf
        hit = np.add.reduce(equal, axis=3) >= need
        hit &= top[..., 0] > 0.0
        found: np.ndarray = np.logical_or.reduce(hit[0] | hit[1], axis=1)
        return found
