"""``representable``: the features the detectors score, clipped to float32's range, and whether any was beyond."""

from __future__ import annotations

import numpy as np
import pytest

from guard_agent.scoring import FLOAT32_MAX, representable


class TestRepresentable:
    @pytest.mark.parametrize("values", [
        [0.0, 1.0, 16.0], [-FLOAT32_MAX, FLOAT32_MAX], [np.nan, 1.0], [np.inf, -np.inf, 0.0], [], [3e38, -3e38],
    ])
    def test_in_range_or_nonfinite_is_returned_as_is(self, values: list[float]) -> None:
        """Nothing finite beyond float32's range: the very array back (NaN and infinities are check_input's)."""
        x = np.asarray([values], dtype=np.float64).reshape(1, -1)
        out, beyond = representable(x)
        assert out is x and beyond is False

    @pytest.mark.parametrize("values", [[1e39, 0.0], [0.0, -1e300], [np.nan, 1e39], [np.inf, -1e39]])
    def test_finite_beyond_range_is_clipped_to_the_edge(self, values: list[float]) -> None:
        """A finite value past float32's range is clipped to the edge with its sign, and said; others stay."""
        x = np.asarray([values], dtype=np.float64)
        out, beyond = representable(x)
        assert beyond is True
        big = np.isfinite(x) & (np.abs(x) > FLOAT32_MAX)
        assert np.array_equal(out[big], np.copysign(FLOAT32_MAX, x[big]))
        assert np.array_equal(out[~big], x[~big], equal_nan=True)
