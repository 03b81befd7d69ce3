"""Rounding model answers of any magnitude: huge values stay finite (np.round alone overflows them to inf)."""

from __future__ import annotations

import warnings

import numpy as np
import orjson

from guard_agent.protocols.hardening import Hardening, harden_matrix, harden_response, round_values


def test_huge_and_non_finite_values_are_kept() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.round(1e308, 3) warns about the overflow
        out = round_values([0.123456, 1e308, -1.7e308, 123456789.98765, 2e15 + 0.5], 3)
    assert out.tolist() == [0.123, 1e308, -1.7e308, 123456789.988, 2e15 + 0.5]
    assert np.isnan(round_values([np.nan], 2)[0])
    assert harden_matrix(np.array([[0.25, 1e300]]), Hardening(round_digits=1)).tolist() == [[0.2, 1e300]]


def test_a_hardened_v2_answer_keeps_a_huge_regression_output() -> None:
    """A regression model answering 1e308: rounding leaves it a number, not null."""
    body = orjson.dumps({"outputs": [{"name": "y", "shape": [2], "datatype": "FP64", "data": [1e308, 0.12345]}]})
    out = harden_response("v2", body, Hardening(round_digits=2))
    assert out is not None
    assert orjson.loads(out)["outputs"][0]["data"] == [1e308, 0.12]
