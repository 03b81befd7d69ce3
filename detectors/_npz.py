"""Deterministic, pickle-free `.npz` bytes: the same arrays always give the same sha256 (a stable
revision)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamp: numpy's own savez stamps the current time


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays as an uncompressed `.npz` archive that `np.load(allow_pickle=False)` reads."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            arr = np.ascontiguousarray(arrays[key])
            if arr.dtype.hasobject:
                raise ValueError(f"array {key!r} has an object dtype; only numeric arrays are stored")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH), member.getvalue())
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """Load every array of an `.npz` archive held in memory, refusing pickled objects."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}
