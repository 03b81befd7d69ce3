"""Isolation Forest: sklearn fits, the trees are kept as flat arrays and traversed vectorised (no pickle,
no sklearn
call when scoring). The adapter flips sklearn's sign once: higher = more anomalous."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import IsolationForest

from ._base import BaseDetector, require_array, require_param
from ._validation import Float32Array, FloatArray

_LEAF_THRESHOLD = float(np.finfo(np.float64).max)  # no float32 value exceeds it: a leaf loops onto itself


def average_path_length(n: npt.ArrayLike) -> FloatArray:
    """Expected path length of an unsuccessful BST search over n items (Liu et al. 2008), as sklearn
    computes it."""
    n_arr = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n_arr)
    out[n_arr == 2] = 1.0
    big = n_arr > 2
    out[big] = 2.0 * (np.log(n_arr[big] - 1.0) + np.euler_gamma) - 2.0 * (n_arr[big] - 1.0) / n_arr[big]
    return out


def _round_down_f32(threshold: FloatArray) -> npt.NDArray[np.float32]:
    """Largest float32 <= each float64 threshold: for float32 x, x > t64 exactly when x > t32, so the
    traversal
    compares in float32 and still takes sklearn's branch (sklearn casts X to float32, thresholds stay
    float64)."""
    with np.errstate(over="ignore"):  # the leaf sentinel becomes +inf, which is what it means
        t32 = threshold.astype(np.float32)
    too_big = t32.astype(np.float64) > threshold
    t32[too_big] = np.nextafter(t32[too_big], np.float32(-np.inf))
    return t32


def flatten_forest(forest: IsolationForest) -> dict[str, np.ndarray]:
    """Relabel every tree breadth-first into shared arrays where right child = left child + 1.

    Leaves point to themselves with an unreachable threshold, so all trees advance in lock-step for `depth`
    steps. `leaf_value` holds sklearn's per-leaf contribution: depth + c(n_node_samples).
    """
    feats: list[int] = []
    thresholds: list[float] = []
    lefts: list[int] = []
    values: list[float] = []
    roots: list[int] = []
    max_depth = 0
    n_features = forest.n_features_in_
    subsample = forest._max_features != n_features
    for est, est_features in zip(forest.estimators_, forest.estimators_features_, strict=True):
        tree = est.tree_
        c_left, c_right = tree.children_left, tree.children_right
        apl = average_path_length(tree.n_node_samples)
        base = len(feats)
        roots.append(base)
        # BFS assigns consecutive slots to sibling pairs
        new_id = {0: base}
        queue: deque[tuple[int, int]] = deque([(0, 0)])
        slots: list[tuple[int, int]] = []
        next_slot = base + 1
        while queue:
            node, depth = queue.popleft()
            slots.append((node, depth))
            if c_left[node] != -1:
                new_id[int(c_left[node])] = next_slot
                new_id[int(c_right[node])] = next_slot + 1
                next_slot += 2
                queue.append((int(c_left[node]), depth + 1))
                queue.append((int(c_right[node]), depth + 1))
        ordered = sorted(slots, key=lambda item: new_id[item[0]])
        for node, depth in ordered:
            max_depth = max(max_depth, depth)
            if c_left[node] == -1:
                feats.append(0)
                thresholds.append(_LEAF_THRESHOLD)
                lefts.append(new_id[node])
                values.append(depth + float(apl[node]))
            else:
                f = int(tree.feature[node])
                feats.append(int(est_features[f]) if subsample else f)
                thresholds.append(float(tree.threshold[node]))
                lefts.append(new_id[int(c_left[node])])
                values.append(0.0)
    return {
        "feature": np.asarray(feats, dtype=np.int64),
        "threshold": np.asarray(thresholds, dtype=np.float64),
        "left": np.asarray(lefts, dtype=np.int64),
        "leaf_value": np.asarray(values, dtype=np.float64),
        "roots": np.asarray(roots, dtype=np.int64),
        "depth": np.asarray([max_depth], dtype=np.int64),
    }


class IsolationForestDetector(BaseDetector):
    """sklearn's IsolationForest anomaly score 2^(-E[h(x)] / c(max_samples)); equals -score_samples to
    ~1e-12."""

    score_name = "ood.iforest"

    def __init__(self, *, n_estimators: int = 100, max_samples: int | str = "auto", seed: int = 0) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.seed = seed

    def _fit(self, X: FloatArray, y: npt.NDArray[Any] | None) -> None:
        forest = IsolationForest(
            n_estimators=self.n_estimators, max_samples=self.max_samples, random_state=self.seed
        ).fit(X)
        self._set_arrays(flatten_forest(forest), int(forest.max_samples_))

    def _set_arrays(self, arrays: dict[str, np.ndarray], max_samples_used: int) -> None:
        self.arrays_ = arrays
        self.max_samples_ = max_samples_used
        self.depth_ = int(arrays["depth"][0])
        n_trees = arrays["roots"].shape[0]
        denom = n_trees * float(average_path_length([max_samples_used])[0])
        self._inv_denom = 0.0 if denom == 0 else 1.0 / denom
        self._single = denom == 0  # one training row: sklearn defines the score as 2^-1
        self._feature, self._threshold = (
            arrays["feature"].astype(np.intp),
            _round_down_f32(arrays["threshold"]),
        )
        self._left, self._leaf_value = arrays["left"].astype(np.intp), arrays["leaf_value"]
        self._roots = arrays["roots"].astype(np.intp)

    def _score(self, X: Float32Array) -> FloatArray:
        n_rows = X.shape[0]
        feature, threshold, left = self._feature, self._threshold, self._left
        if n_rows == 1:  # the per-request hot path: one row, all trees advance together
            x = X[0]
            node = self._roots
            for _ in range(self.depth_):
                node = left[node] + (x[feature[node]] > threshold[node])
        else:
            flat = X.ravel()
            row_base = (np.arange(n_rows, dtype=np.intp) * X.shape[1])[:, None]
            node = np.broadcast_to(self._roots, (n_rows, self._roots.shape[0]))
            for _ in range(self.depth_):
                node = left[node] + (flat[row_base + feature[node]] > threshold[node])
        if self._single:
            return np.full(n_rows, 0.5)
        depths = self._leaf_value[node].sum(axis=-1).reshape(n_rows)
        return np.asarray(np.exp2(-depths * self._inv_denom), dtype=np.float64)

    def _params(self) -> dict[str, Any]:
        return {
            "n_estimators": self.n_estimators,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "max_samples_used": self.max_samples_,
            "n_nodes": int(self._feature.shape[0]),
            "n_trees": int(self._roots.shape[0]),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays_)

    def _restore(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        owner = "IsolationForestDetector"
        n_nodes = require_param(params, "n_nodes", int, owner)
        n_trees = require_param(params, "n_trees", int, owner)
        used = require_param(params, "max_samples_used", int, owner)
        self.n_estimators = int(params.get("n_estimators", 100))
        self.max_samples = params.get("max_samples", "auto")
        self.seed = int(params.get("seed", 0))
        restored = {
            "feature": require_array(arrays, "feature", (n_nodes,), owner).astype(np.int64),
            "threshold": require_array(arrays, "threshold", (n_nodes,), owner).astype(np.float64),
            "left": require_array(arrays, "left", (n_nodes,), owner).astype(np.int64),
            "leaf_value": require_array(arrays, "leaf_value", (n_nodes,), owner).astype(np.float64),
            "roots": require_array(arrays, "roots", (n_trees,), owner).astype(np.int64),
            "depth": require_array(arrays, "depth", (1,), owner).astype(np.int64),
        }
        f, left, roots = restored["feature"], restored["left"], restored["roots"]
        if n_trees < 1 or used < 1:
            raise ValueError(f"{owner}: needs at least one tree and one sample")
        # bounds checks make a tampered index impossible to turn into an out-of-range read
        if f.min() < 0 or f.max() >= self.n_features_in_:
            raise ValueError(f"{owner}: feature index out of range")
        if left.min() < 0 or left.max() >= n_nodes or roots.min() < 0 or roots.max() >= n_nodes:
            raise ValueError(f"{owner}: node index out of range")
        if not 0 <= int(restored["depth"][0]) <= 64:
            raise ValueError(f"{owner}: depth out of range")
        is_leaf = left == np.arange(n_nodes)
        if np.any(left[~is_leaf] + 1 >= n_nodes):
            raise ValueError(f"{owner}: node index out of range")
        self._set_arrays(restored, used)
