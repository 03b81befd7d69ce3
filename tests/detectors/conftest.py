"""Shared data for detector tests: a correlated Gaussian with fresh samples from the same distribution."""

from __future__ import annotations

import numpy as np
import pytest


class Gaussian:
    """A fixed correlated Gaussian in `d` dimensions; `sample(n, seed)` draws fresh in-distribution rows."""

    def __init__(self, d: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.d = d
        self.mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
        self.mean = rng.normal(size=d) * 3

    def sample(self, n: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).normal(size=(n, self.d))
        return z @ self.mix + self.mean


@pytest.fixture(scope="session")
def gauss() -> Gaussian:
    return Gaussian()


@pytest.fixture(scope="session")
def reference(gauss: Gaussian) -> np.ndarray:
    return gauss.sample(3000, seed=1)
