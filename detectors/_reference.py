"""Reading reference data for `fit`: `.npy` (2-D; higher dimensions flattened per row) or numeric CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._errors import ProfileError

Reference = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None, tuple[str, ...]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_reference(path: str | Path, *, label_column: str | None = None) -> Reference:
    """Return (X, labels or None, feature names). Raises ProfileError naming the file and what is wrong.

    `.npy` arrays are loaded without pickle; 1-D arrays are refused (ambiguous), higher dimensions are
    flattened per row. CSV files are numeric, comma-separated, with an optional header row (detected when any
    field of the first row is not a number); `label_column` needs a header and removes that column from X.
    """
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: reference data file not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        if label_column is not None:
            raise ProfileError(f"{p}: --label-column applies to CSV input; give .npy labels with --labels")
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ProfileError(f"{p}: not a readable pickle-free .npy array ({exc})") from exc
        if arr.dtype.kind not in "biuf":
            raise ProfileError(f"{p}: array dtype {arr.dtype} is not numeric")
        if arr.ndim < 2:
            raise ProfileError(f"{p}: expected a 2-D array (rows x features), got shape {arr.shape}")
        X = arr.reshape(arr.shape[0], -1).astype(np.float64)
        names = tuple(f"x{i}" for i in range(X.shape[1]))
        labels = None
    elif suffix == ".csv":
        X, labels, names = _load_csv(p, label_column)
    else:
        raise ProfileError(f"{p}: unsupported reference format {suffix!r}; use .npy or .csv")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ProfileError(f"{p}: no data (shape {X.shape})")
    if not np.isfinite(X).all():
        row, col = np.argwhere(~np.isfinite(X))[0]
        raise ProfileError(f"{p}: NaN or infinity at row {row}, feature {names[col]!r}")
    return X, labels, names


def _load_csv(p: Path, label_column: str | None) -> Reference:
    with p.open(newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ProfileError(f"{p}: empty CSV file")
    header: list[str] | None = None
    if not all(_is_number(cell) for cell in rows[0]):
        header = [cell.strip() for cell in rows[0]]
        rows = rows[1:]
    width = len(header) if header is not None else len(rows[0]) if rows else 0
    values = np.empty((len(rows), width), dtype=np.float64)
    first_data_line = 2 if header is not None else 1
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ProfileError(f"{p}: line {i + first_data_line} has {len(row)} fields, expected {width}")
        for j, cell in enumerate(row):
            try:
                value = float(cell)
            except ValueError:
                raise ProfileError(
                    f"{p}: line {i + first_data_line}, column {j + 1}: {cell.strip()!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise ProfileError(f"{p}: line {i + first_data_line}, column {j + 1}: NaN or infinity")
            values[i, j] = value
    names = header if header is not None else [f"x{j}" for j in range(width)]
    labels = None
    if label_column is not None:
        if header is None:
            raise ProfileError(f"{p}: --label-column {label_column!r} needs a header row")
        if label_column not in header:
            raise ProfileError(f"{p}: label column {label_column!r} not in header {header}")
        j = header.index(label_column)
        labels = values[:, j].copy()
        values = np.delete(values, j, axis=1)
        names = [n for k, n in enumerate(names) if k != j]
    return values, labels, tuple(names)
