"""Feature squeezing's pure parts: the squeezed copies and the prediction distance."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import squeeze_distance, squeeze_variants
from detectors.squeeze import median_smooth, reduce_bit_depth, round_significant


class TestSqueezeVariants:
    def test_image_rows_get_bit_depth_and_median_copies_of_same_shape(self) -> None:
        """2-D row shapes are images: two variants, each shaped like the input batch."""
        X = np.random.default_rng(0).uniform(0, 1, size=(5, 64))
        variants = squeeze_variants(X, (8, 8))
        assert len(variants) == 2
        assert all(v.shape == X.shape for v in variants)

    def test_bit_depth_one_gives_binary_images(self) -> None:
        """bit_depth=1 on [0, 1] data leaves only the values 0 and 1 (Xu et al.'s MNIST squeezer)."""
        X = np.random.default_rng(1).uniform(0, 1, size=(3, 16))
        reduced = squeeze_variants(X, (4, 4), bit_depth=1)[0]
        assert set(np.unique(reduced)) <= {0.0, 1.0}

    def test_value_range_respected(self) -> None:
        """With value_range (0, 16) (digits) a 4-bit squeeze keeps values on a 16/15 grid inside the range."""
        X = np.random.default_rng(2).uniform(0, 16, size=(4, 64))
        reduced = reduce_bit_depth(X, 4, (0.0, 16.0))
        steps = reduced / (16.0 / 15.0)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
        assert reduced.min() >= 0.0
        assert reduced.max() <= 16.0

    def test_median_removes_isolated_pixel_not_across_rows(self) -> None:
        """A single bright pixel disappears under a 3x3 median; neighbouring images are not mixed."""
        imgs = np.zeros((2, 5, 5))
        imgs[0, 2, 2] = 1.0
        imgs[1] = 0.5
        out = median_smooth(imgs.reshape(2, 25), (5, 5), 3).reshape(2, 5, 5)
        assert out[0].max() == 0.0
        np.testing.assert_array_equal(out[1], 0.5)

    def test_channel_last_images_smoothed_per_channel(self) -> None:
        """(H, W, C) rows are filtered over H and W only; channel values never mix."""
        imgs = np.zeros((1, 4, 4, 3))
        imgs[..., 1] = 1.0
        out = median_smooth(imgs.reshape(1, -1), (4, 4, 3), 2).reshape(1, 4, 4, 3)
        np.testing.assert_array_equal(out[..., 1], 1.0)
        np.testing.assert_array_equal(out[..., 0], 0.0)

    def test_channel_first_images_detected(self) -> None:
        """(C, H, W) with a small first axis is treated as channel-first."""
        imgs = np.zeros((1, 3, 6, 6))
        imgs[:, 0] = 1.0
        out = median_smooth(imgs.reshape(1, -1), (3, 6, 6), 2).reshape(1, 3, 6, 6)
        np.testing.assert_array_equal(out[:, 0], 1.0)
        np.testing.assert_array_equal(out[:, 1:], 0.0)

    def test_tabular_rounding_is_scale_free(self) -> None:
        """Tabular rows: rounding to 2 significant digits works for tiny and huge features alike."""
        np.testing.assert_allclose(round_significant([[0.0012345, 98765.0, 0.0]], 2), [[0.0012, 99000.0, 0.0]])
        variants = squeeze_variants(np.array([[0.0012345, 98765.0], [1.0, 2.0]]), (2,))
        assert len(variants) == 2
        np.testing.assert_allclose(variants[0], [[0.0012, 99000.0], [1.0, 2.0]])

    def test_shape_mismatch_and_nan_refused(self) -> None:
        """A row_shape that does not match the row length, or NaN, raises ValueError."""
        with pytest.raises(ValueError, match="row_shape"):
            squeeze_variants(np.zeros((1, 10)), (3, 3))
        bad = np.zeros((1, 4))
        bad[0, 1] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            squeeze_variants(bad, (2, 2))

    def test_batch_shaped_input_keeps_its_shape(self) -> None:
        """A batch given as (n, H, W) comes back as (n, H, W)."""
        X = np.random.default_rng(3).uniform(size=(2, 4, 4))
        assert all(v.shape == (2, 4, 4) for v in squeeze_variants(X, (4, 4)))


class TestSqueezeDistance:
    def test_max_l1_over_variants(self) -> None:
        """The distance is the largest L1 change over the squeezed predictions, per row."""
        p = np.array([[0.9, 0.1], [0.5, 0.5]])
        s1 = np.array([[0.8, 0.2], [0.5, 0.5]])
        s2 = np.array([[0.1, 0.9], [0.4, 0.6]])
        np.testing.assert_allclose(squeeze_distance(p, [s1, s2]), [1.6, 0.2])

    def test_identical_predictions_score_zero(self) -> None:
        """Unchanged predictions give 0; a full flip between one-hot vectors gives 2."""
        p = np.eye(3)
        np.testing.assert_allclose(squeeze_distance(p, [p]), 0.0)
        np.testing.assert_allclose(squeeze_distance(p, [np.roll(p, 1, axis=1)]), 2.0)

    def test_mismatched_shapes_refused(self) -> None:
        """Different class counts or an empty list are errors."""
        with pytest.raises(ValueError, match="features"):
            squeeze_distance(np.eye(3), [np.eye(2)])
        with pytest.raises(ValueError, match="empty"):
            squeeze_distance(np.eye(3), [])
