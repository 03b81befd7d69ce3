"""Feature squeezing (Xu, Evans, Qi, NDSS 2018): the pure parts. The guard sends the squeezed copies to the
model and compares its predictions; a large change between original and squeezed predictions suggests an
adversarial input. Costs extra model calls, so it is opt-in per route (wired in the guard, not here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.ndimage import median_filter

from ._validation import FloatArray, as_rows

SqueezeKind = Literal["auto", "image", "tabular"]
FeatureRange = tuple[npt.ArrayLike, npt.ArrayLike]


def _value_range(X: FloatArray, value_range: tuple[float, float] | None) -> tuple[float, float]:
    if value_range is not None:
        low, high = float(value_range[0]), float(value_range[1])
    else:  # documented default: [0, 1] images, widened to the batch's values when they exceed it
        low, high = min(0.0, float(X.min())), max(1.0, float(X.max()))
    if not high > low:
        raise ValueError(f"value_range must have high > low, got ({low}, {high})")
    return low, high


def reduce_bit_depth(
    X: npt.ArrayLike, bits: int, value_range: tuple[float, float] | None = None
) -> FloatArray:
    """Quantise values to 2**bits levels over `value_range` (default: [0, 1] widened to the data)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bit_depth must be in 1..16, got {bits}")
    X64 = np.asarray(X, dtype=np.float64)
    low, high = _value_range(X64, value_range)
    levels = 2**bits - 1
    unit = np.clip((X64 - low) / (high - low), 0.0, 1.0)
    return np.asarray(np.round(unit * levels) / levels * (high - low) + low, dtype=np.float64)


def _channel_axis(row_shape: tuple[int, ...]) -> int | None:
    """None for 2-D rows; for 3-D rows the channel axis: last (HWC) unless the first is small and the last
    is not."""
    if len(row_shape) == 2:
        return None
    if row_shape[0] <= 4 < row_shape[-1]:
        return 0
    return 2


def median_smooth(images: npt.ArrayLike, row_shape: tuple[int, ...], size: int) -> FloatArray:
    """Median filter of `size` x `size` over the spatial axes of each image (never across channels or
    rows)."""
    if size < 1:
        raise ValueError(f"median_size must be >= 1, got {size}")
    batch = np.asarray(images, dtype=np.float64).reshape((-1, *row_shape))
    channel = _channel_axis(row_shape)
    footprint = [1] + [size] * len(row_shape)
    if channel is not None:
        footprint[channel + 1] = 1
    return np.asarray(median_filter(batch, size=tuple(footprint), mode="reflect"), dtype=np.float64)


def round_significant(X: npt.ArrayLike, digits: int) -> FloatArray:
    """Round to `digits` significant digits: a scale-free squeezer for tabular features of any magnitude."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    X64 = np.asarray(X, dtype=np.float64)
    magnitude = np.floor(np.log10(np.where(X64 == 0, 1.0, np.abs(X64))))
    factor = 10.0 ** (digits - 1 - magnitude)
    return np.asarray(np.round(X64 * factor) / factor, dtype=np.float64)


def tabular_variants(
    rows: npt.ArrayLike, bit_depth: int, feature_range: FeatureRange | None = None, digits: int = 2
) -> list[FloatArray]:
    """Two squeezed copies of a (rows, features) batch: [rounding to `digits` significant digits, bit-depth
    reduction of each feature to ``2**bit_depth`` levels over `feature_range`, clipped to it].

    `feature_range` (low, high per feature) should be the reference data's (a profile's input-schema bounds):
    then every request is put on the same grid whatever its size. None uses the batch's own range, which is
    empty for a single row. A feature whose range is empty (constant in the reference, or one row without a
    reference) keeps its value in the second copy: there is no grid to put it on.
    """
    x = np.asarray(rows, dtype=np.float64)
    if feature_range is None:
        low, high = x.min(axis=0), x.max(axis=0)
    else:
        low, high = (np.asarray(b, dtype=np.float64).reshape(-1) for b in feature_range)
        if low.shape != (x.shape[1],) or high.shape != (x.shape[1],):
            raise ValueError(f"feature_range has {low.size}/{high.size} bounds for {x.shape[1]} features")
    span = high - low
    usable = span > 0
    levels = 2**bit_depth - 1
    safe = np.where(usable, span, 1.0)
    unit = np.clip((x - low) / safe, 0.0, 1.0)
    quantised = np.where(usable, np.round(unit * levels) / levels * safe + low, x)
    return [round_significant(x, digits), np.asarray(quantised, dtype=np.float64)]


def squeeze_variants(
    X: npt.ArrayLike,
    row_shape: Sequence[int],
    *,
    kind: SqueezeKind = "auto",
    bit_depth: int = 4,
    median_size: int = 2,
    digits: int = 2,
    value_range: tuple[float, float] | None = None,
    feature_range: FeatureRange | None = None,
) -> list[FloatArray]:
    """Squeezed copies of the batch `X` (rows flattened or shaped `row_shape`), each shaped like `X`.

    "image" (auto when `row_shape` is 2-D or 3-D): [bit-depth reduction over `value_range`, median smoothing],
    as in Xu et al. "tabular" (auto otherwise): :func:`tabular_variants` over `feature_range`. NaN/Inf are
    refused like everywhere in the library.
    """
    shape = tuple(int(s) for s in row_shape)
    arr = np.asarray(X)
    original_shape = arr.shape
    rows = as_rows(arr.reshape(arr.shape[0], -1) if arr.ndim > 2 else arr)
    if int(np.prod(shape)) != rows.shape[1]:
        raise ValueError(f"row_shape {shape} does not match {rows.shape[1]} values per row")
    if kind == "auto":
        kind = "image" if len(shape) in (2, 3) else "tabular"
    if kind == "image":
        if len(shape) not in (2, 3):
            raise ValueError(f"image squeezing needs a 2-D or 3-D row_shape, got {shape}")
        variants = [
            reduce_bit_depth(rows, bit_depth, value_range),
            median_smooth(rows, shape, median_size).reshape(rows.shape),
        ]
    elif kind == "tabular":
        variants = tabular_variants(rows, bit_depth, feature_range, digits)
    else:
        raise ValueError(f"kind must be 'auto', 'image' or 'tabular', got {kind!r}")
    return [v.reshape(original_shape) for v in variants]


def squeeze_distance(p_orig: npt.ArrayLike, p_squeezed_list: Sequence[npt.ArrayLike]) -> FloatArray:
    """Per row, the largest L1 distance between the original and any squeezed prediction (0..2 for
    probabilities).

    Inputs are probability vectors (rows x classes), e.g. softmax outputs; a 1-D input is one row.
    """
    p0 = as_rows(p_orig, name="p_orig")
    if not p_squeezed_list:
        raise ValueError("p_squeezed_list is empty")
    dists = [
        np.abs(p0 - as_rows(p, n_features=p0.shape[1], name="p_squeezed")).sum(axis=1)
        for p in p_squeezed_list
    ]
    for d in dists:
        if d.shape != (p0.shape[0],):
            raise ValueError(f"squeezed predictions have {d.shape[0]} rows, original has {p0.shape[0]}")
    return np.asarray(np.max(np.stack(dists), axis=0), dtype=np.float64)
