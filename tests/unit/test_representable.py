"""``representable``: the features the detectors score, clipped to float32's range, and whether any was beyond."""

from __future__ import annotations

import numpy as np
import pytest

from guard_agent.policy.model import InputSchema
from guard_agent.scoring import FLOAT32_MAX, InputSchemaError, check_input, representable, within_float32


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


class TestWithinFloat32:
    @pytest.mark.parametrize(("values", "inside"), [
        ([0.0, 1.0, 16.0], True), ([-FLOAT32_MAX, FLOAT32_MAX], True), ([np.nan, 1.0], False),
        ([np.inf, 0.0], False), ([-np.inf], False), ([1e39], False), ([], False),
    ])
    def test_true_only_when_every_value_is_finite_and_in_range(self, values: list[float], inside: bool) -> None:
        """Two reductions say what an element-wise scan says: finite and within float32's range, every value."""
        x = np.asarray([values], dtype=np.float64).reshape(1, -1)
        assert within_float32(x) is inside
        assert within_float32(x) == bool(x.size and np.isfinite(x).all() and (np.abs(x) <= FLOAT32_MAX).all())

    def test_agrees_with_the_element_wise_test_on_random_magnitudes(self) -> None:
        """Values from tiny to far beyond float32's range, NaN and infinities mixed in: the same answer as
        checking every value (the sum-of-squares shortcut never says yes wrongly)."""
        rng = np.random.default_rng(0)
        for _ in range(3000):
            width = int(rng.integers(1, 80))
            x = rng.standard_normal((int(rng.integers(1, 4)), width)) * 10.0 ** rng.uniform(-300, 300, width)
            if rng.random() < 0.2:
                x.flat[int(rng.integers(x.size))] = rng.choice([np.nan, np.inf, -np.inf, FLOAT32_MAX, -FLOAT32_MAX,
                                                                 np.nextafter(FLOAT32_MAX, np.inf)])
            exact = bool(np.isfinite(x).all() and (np.abs(x) <= FLOAT32_MAX).all())
            assert within_float32(x) is exact

    def test_check_input_still_refuses_nonfinite_without_the_hint(self) -> None:
        """Without ``in_float32_range`` (or with it false) NaN is refused as the policy says; with it the caller
        vouches for the values (as the proxy does after ``within_float32``)."""
        schema = InputSchema()
        x = np.asarray([[np.nan, 1.0]])
        with pytest.raises(InputSchemaError):
            check_input(x, schema, expected_features=None)
        with pytest.raises(InputSchemaError):
            check_input(x, schema, expected_features=None, in_float32_range=within_float32(x))
        check_input(np.asarray([[0.0, 1.0]]), schema, expected_features=None, in_float32_range=True)
