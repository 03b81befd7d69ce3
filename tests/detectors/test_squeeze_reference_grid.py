"""Tabular squeezing on the reference grid: one row is squeezed like a batch."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.squeeze import squeeze_variants, tabular_variants


def test_a_single_row_is_quantised_on_the_reference_range() -> None:
    """With the reference's per-feature range, a single row lands on the same grid as in a batch (the batch's own
    range is empty for one row, so without it the bit-depth copy is the row itself)."""
    low, high = np.array([0.0, 10.0, 5.0]), np.array([1.0, 20.0, 5.0])
    row = np.array([[0.34, 13.1, 5.0]])
    _, alone = squeeze_variants(row, (3,), bit_depth=2, feature_range=(low, high))
    np.testing.assert_allclose(alone, [[1 / 3, 40 / 3, 5.0]])  # levels at 0, 1/3, 2/3, 1 of each range
    batch = np.vstack([row, [[0.9, 19.0, 5.0]]])
    np.testing.assert_allclose(tabular_variants(batch, 2, (low, high))[1][0], alone[0])
    np.testing.assert_array_equal(squeeze_variants(row, (3,), bit_depth=2)[1], row)


def test_values_outside_the_reference_range_are_clipped_to_it() -> None:
    _, q = tabular_variants(np.array([[-5.0, 99.0]]), 3, (np.zeros(2), np.ones(2)))
    np.testing.assert_allclose(q, [[0.0, 1.0]])


def test_bounds_for_another_width_are_refused() -> None:
    with pytest.raises(ValueError, match="2/2 bounds for 3 features"):
        tabular_variants(np.zeros((1, 3)), 2, (np.zeros(2), np.ones(2)))
