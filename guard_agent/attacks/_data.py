"""Query data an attacker without the training set would use."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["natural_patches", "uniform_queries"]


def natural_patches(rng: np.random.Generator, n: int, *, side: int = 8, hi: float = 16.0) -> np.ndarray:
    """Grey side x side patches (4x downsampled) of scikit-learn's two sample photographs, scaled to
    [0, hi]: natural images of another distribution than the model's (works offline, needs pillow)."""
    imgs = _grey_photos()
    out = np.empty((n, side * side))
    for i in range(n):
        im = imgs[int(rng.integers(len(imgs)))]
        r = int(rng.integers(0, im.shape[0] - 4 * side))
        c = int(rng.integers(0, im.shape[1] - 4 * side))
        block = im[r : r + 4 * side, c : c + 4 * side].reshape(side, 4, side, 4).mean(axis=(1, 3))
        out[i] = block.reshape(-1) / 255.0 * hi
    return out


@functools.cache
def _grey_photos() -> tuple[np.ndarray, ...]:
    """The sample photographs in grey, decoded once per process (decoding takes seconds)."""
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.float64).mean(axis=2) for im in load_sample_images().images)


def uniform_queries(rng: np.random.Generator, n: int, d: int, *, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Uniform random points of the input box."""
    return rng.uniform(lo, hi, size=(n, d))
