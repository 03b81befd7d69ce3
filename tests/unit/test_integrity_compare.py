"""Choosing canaries and comparing answers: pure functions, table-tested."""

from __future__ import annotations

import numpy as np
import pytest

from guard_agent.integrity import CanarySet, compare_answers, metadata_changes, select_canaries, top2_margin


def answers(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    logits = X @ rng.normal(size=(5, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return X, np.argmax(probs, axis=1), probs


class TestSelect:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_kinds_counts_and_margins(self, seed: int) -> None:
        """Distinct rows; one prototype per class (up to a third); the boundary rows are the smallest
        margins above the floor; no chosen row sits below the floor."""
        X, labels, probs = answers(500, 4, seed)
        sel = select_canaries(X, labels, probs, count=40, rng=np.random.default_rng(seed), min_margin=0.01)
        assert len(sel.indices) == 40
        assert len(set(sel.indices.tolist())) == 40
        kinds = np.array(sel.kinds)
        proto = sel.indices[kinds == "prototype"]
        assert sorted(labels[proto].tolist()) == sorted(set(labels.tolist()))
        margin = top2_margin(probs)
        assert (margin[sel.indices] >= 0.01).all()
        boundary = sel.indices[kinds == "boundary"]
        assert len(boundary) == 10
        eligible = np.sort(margin[(margin >= 0.01)])
        assert margin[boundary].max() <= eligible[len(boundary) + len(proto)]

    def test_prototype_is_nearest_to_its_class_centroid(self) -> None:
        """The prototype of a class is the row closest to the mean of the rows predicted as that class."""
        X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [13.0]])
        labels = np.array([0, 0, 0, 1, 1, 1])
        sel = select_canaries(X, labels, None, count=3, rng=np.random.default_rng(0))
        assert set(sel.indices[np.array(sel.kinds) == "prototype"].tolist()) == {1}  # count // 3 = 1 class

    def test_labels_only_model(self) -> None:
        """Without probabilities there are no boundary rows, but prototypes and samples still fill the set."""
        X, labels, _ = answers(200, 3, 5)
        sel = select_canaries(X, labels, None, count=12, rng=np.random.default_rng(0))
        assert "boundary" not in sel.kinds
        assert sel.kinds.count("prototype") == 3
        assert len(sel.indices) == 12

    def test_fewer_rows_than_asked(self) -> None:
        """A tiny pool yields every usable row once, not duplicates."""
        X, labels, probs = answers(5, 2, 3)
        sel = select_canaries(X, labels, probs, count=50, rng=np.random.default_rng(0), min_margin=0.0)
        assert sorted(sel.indices.tolist()) == [0, 1, 2, 3, 4]


def canary_set(labels: np.ndarray | None, probs: np.ndarray | None, atol: float = 1e-3) -> CanarySet:
    n = len(labels) if labels is not None else len(probs)  # type: ignore[arg-type]
    return CanarySet(model="m", inputs=np.zeros((n, 2)), labels=labels, probabilities=probs,
                     kinds=("sample",) * n, probability_atol=atol, revision="r1")


class TestCompare:
    def test_identical_answers_pass(self) -> None:
        """The recorded answers compared with themselves pass with zero difference."""
        _, labels, probs = answers(20, 3, 0)
        result = compare_answers(canary_set(labels, probs), labels.copy(), probs.copy())
        assert result.ok
        assert result.differed == 0
        assert result.max_probability_diff == 0.0

    def test_noise_within_tolerance_passes(self) -> None:
        """Differences below the tolerance (another BLAS, another CPU) are not a violation."""
        _, labels, probs = answers(20, 3, 0)
        result = compare_answers(canary_set(labels, probs, atol=1e-3), labels, probs + 5e-4)
        assert result.ok

    def test_probability_shift_named_with_its_size(self) -> None:
        """One canary's probabilities moved by 0.2: it alone is reported, with the difference."""
        _, labels, probs = answers(20, 3, 0)
        moved = probs.copy()
        moved[7] = moved[7] * 0.8 + 0.2 * np.eye(3)[labels[7]]
        result = compare_answers(canary_set(labels, probs), labels, moved)
        assert not result.ok
        assert result.differed == 1
        assert result.label_mismatches == 0
        assert result.diffs[0].index == 7
        assert result.diffs[0].probability_diff == pytest.approx(np.abs(moved[7] - probs[7]).max())

    def test_label_flip_counted(self) -> None:
        """A changed label is a mismatch even when the set has no probabilities."""
        labels = np.array([0, 1, 2, 1])
        got = np.array([0, 1, 1, 1])
        result = compare_answers(canary_set(labels, None), got, None)
        assert result.label_mismatches == 1
        assert result.diffs[0].as_dict() == {"index": 2, "kind": "sample", "expected_label": 2, "got_label": 1,
                                             "probability_diff": None}

    def test_changed_shape_fails_every_canary(self) -> None:
        """A model with another number of classes fails all canaries, with the reason."""
        _, labels, probs = answers(10, 3, 0)
        result = compare_answers(canary_set(labels, probs), labels, np.ones((10, 4)) / 4)
        assert result.differed == 10
        assert result.reason is not None
        assert "[10, 4]" in result.reason

    def test_missing_answer_fails(self) -> None:
        """No probabilities in the answer where some were recorded is a failure, not a pass."""
        _, labels, probs = answers(10, 3, 0)
        assert not compare_answers(canary_set(labels, probs), labels, None).ok


class TestMetadata:
    @pytest.mark.parametrize(("recorded", "current", "changed"), [
        ({"name": "m", "versions": ["1"]}, {"name": "m", "versions": ["1"]}, ()),
        ({"name": "m", "versions": ["1"]}, {"name": "m", "versions": ["2"]}, ("versions",)),
        ({"name": "m"}, {"name": "m", "platform": "onnx"}, ("platform",)),
        ({"name": "m"}, None, ("<unavailable>",)),
        (None, {"name": "m"}, ()),
    ])
    def test_changed_fields(self, recorded: dict[str, object] | None, current: dict[str, object] | None,
                            changed: tuple[str, ...]) -> None:
        """Top-level fields that differ are named; nothing recorded means nothing to compare."""
        assert metadata_changes(recorded, current) == changed
