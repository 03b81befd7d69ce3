"""File identity for polling watchers (policy, profile, keys, certificates).

A Kubernetes ConfigMap or Secret update swaps a ``..data`` symlink atomically:
the path stays the same, the target changes. ``os.stat`` follows symlinks, so
(device, inode, size, mtime) changes with the target even when the path does not.
"""

from __future__ import annotations

import os

__all__ = ["FileIdentity", "file_identity"]

FileIdentity = tuple[int, int, int, int]


def file_identity(path: str | os.PathLike[str] | None) -> FileIdentity | None:
    """The identity of the file behind ``path`` (symlinks followed); None when it cannot be read."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
