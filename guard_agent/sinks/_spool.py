"""A FIFO of event lines on disk: append-only segment files and a committed cursor.

Every event bound for a sink is written here first (write-ahead), so a crash or a
restart loses nothing that reached the spool: the page cache survives the process,
and the next start resumes from the last committed cursor (at least once: the batch
in flight when the process died is sent again). Segments are deleted once their
events are delivered; the total size is bounded and an append that would exceed it
is refused (the caller counts those events as dropped).

Layout of ``<spool_dir>/<sink>/``: ``<seq>.seg`` (newline-terminated lines),
``cursor`` (``<seq> <offset>`` of the next undelivered line, replaced atomically),
``lock`` (flock: one process per spool).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Appended", "Batch", "Spool", "SpoolLockedError"]


class SpoolLockedError(OSError):
    """Another process holds this spool (two guards must not share a spool directory)."""


@dataclass(frozen=True)
class Appended:
    """How many lines of an ``append`` reached the spool, and why the rest did not (None: all did)."""

    written: int
    reason: str | None


@dataclass(frozen=True)
class Batch:
    """Lines read from the spool, and the position just after the last one (committed on delivery)."""

    lines: tuple[bytes, ...]
    end: tuple[int, int]


def _seg_name(seq: int) -> str:
    return f"{seq:020d}.seg"


def _count_lines(path: Path, offset: int) -> int:
    count = 0
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count


class Spool:
    """Thread-safe for one writer thread and one reader thread."""

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int, segment_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        # many segments per spool: delivered space is given back a segment at a time
        self.segment_bytes = segment_bytes or max(4096, min(16 * 1024 * 1024, max_bytes // 16))
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolLockedError(f"spool {self.dir} is in use by another process") from None
        self._cond = threading.Condition()
        self._sizes: dict[int, int] = {}
        self._pending = 0      # appended, not yet committed
        self._unread = 0       # appended, not yet handed to the reader
        self.recovered = 0     # events found from a previous run
        self._closed = False
        self._rfile: BinaryIO | None = None
        self._recover()

    # recovery -----------------------------------------------------------------------------------------
    def _recover(self) -> None:
        seqs = sorted(int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit())
        cseq, coff = self._read_cursor(seqs)
        for seq in [s for s in seqs if s < cseq]:
            (self.dir / _seg_name(seq)).unlink(missing_ok=True)
        seqs = [s for s in seqs if s >= cseq]
        if seqs and seqs[0] != cseq:
            cseq, coff = seqs[0], 0
        if seqs:
            self._truncate_torn_tail(self.dir / _seg_name(seqs[-1]))
        for seq in seqs:
            path = self.dir / _seg_name(seq)
            self._sizes[seq] = path.stat().st_size
            self.recovered += _count_lines(path, coff if seq == cseq else 0)
        self._pending = self._unread = self.recovered
        self._rseq, self._roff = (cseq, coff) if seqs else (cseq + 1, 0)
        self._wseq = (seqs[-1] if seqs else cseq) + 1
        self._open_writer()

    def _read_cursor(self, seqs: list[int]) -> tuple[int, int]:
        try:
            seq_text, off_text = (self.dir / "cursor").read_text().split()
            return int(seq_text), int(off_text)
        except (OSError, ValueError):
            return (seqs[0] if seqs else 0), 0

    @staticmethod
    def _truncate_torn_tail(path: Path) -> None:
        """A crash mid-append can leave a partial last line: cut it (it was never acknowledged to anyone)."""
        size = path.stat().st_size
        if size == 0:
            return
        with path.open("r+b") as f:
            start = max(0, size - (1 << 20))
            f.seek(start)
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(start + cut + 1 if cut >= 0 else start)

    def _open_writer(self) -> None:
        """Unbuffered appends: each ``append`` is on disk (page cache) before it returns, or undone."""
        self._wfd = os.open(self.dir / _seg_name(self._wseq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._sizes.setdefault(self._wseq, 0)

    # writer side --------------------------------------------------------------------------------------
    def append(self, lines: Sequence[bytes]) -> Appended:
        """Append in order until the size limit or a disk error; the lines not written must be dropped."""
        with self._cond:
            if self._closed:
                return Appended(0, "spool closed")
            total = sum(self._sizes.values())
            records = []
            for line in lines:
                record = line.replace(b"\n", b" ") + b"\n"
                if total + len(record) > self.max_bytes:
                    break
                records.append(record)
                total += len(record)
            written, error = self._write(records)
            if written:
                self._pending += written
                self._unread += written
                self._cond.notify_all()
            if error is not None:
                return Appended(written, f"spool_write_error: {error.strerror or error}")
            return Appended(written, None if written == len(lines) else "spool_full")

    def _write(self, records: list[bytes]) -> tuple[int, OSError | None]:
        """All records in one write; after a disk error, as many whole records as the disk takes."""
        if not records:
            return 0, None
        try:
            self._write_all(b"".join(records))
        except OSError as first_error:
            written = 0
            for record in records:
                try:
                    self._write_all(record)
                except OSError as exc:
                    return written, exc
                written += 1
            return written, first_error if written < len(records) else None
        finally:
            if self._sizes[self._wseq] >= self.segment_bytes:
                with contextlib.suppress(OSError):
                    self._rotate()
        return len(records), None

    def _write_all(self, data: bytes) -> None:
        """Write ``data`` completely or not at all (a half line never stays in a segment)."""
        start = self._sizes[self._wseq]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._wfd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._wfd, start)
            raise
        self._sizes[self._wseq] += len(data)

    def _rotate(self, *, sync: bool = True) -> None:
        if sync:
            os.fsync(self._wfd)
        # open the next segment first: if that fails (ENOSPC, EMFILE) the current one stays the writer's
        new_seq = self._wseq + 1
        new_fd = os.open(self.dir / _seg_name(new_seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(self._wfd)
        self._wfd, self._wseq = new_fd, new_seq
        self._sizes.setdefault(new_seq, 0)

    # reader side --------------------------------------------------------------------------------------
    def read(self, max_events: int, max_bytes: int, timeout: float) -> Batch | None:
        """The next lines after those already read (at least one when any is there), waiting up to ``timeout``."""
        with self._cond:
            if not self._unread and not self._closed:
                self._cond.wait(timeout)
            if not self._unread or self._closed:
                return None
            lines: list[bytes] = []
            size = 0
            while len(lines) < max_events and size < max_bytes:
                f = self._reader()
                line = f.readline()
                if line.endswith(b"\n"):
                    lines.append(line[:-1])
                    size += len(line)
                    self._roff += len(line)
                    continue
                if self._rseq < self._wseq:      # a finished segment: go on with the next one
                    self._close_reader()
                    self._rseq = min(s for s in self._sizes if s > self._rseq)
                    self._roff = 0
                    continue
                break
            self._unread -= len(lines)
            return Batch(tuple(lines), (self._rseq, self._roff))

    def _reader(self) -> BinaryIO:
        if self._rfile is None:
            self._rfile = (self.dir / _seg_name(self._rseq)).open("rb")
            self._rfile.seek(self._roff)
        return self._rfile

    def _close_reader(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None

    def rewind(self) -> None:
        """Forget what was read but not committed (a reader restarting from the cursor)."""
        with self._cond:
            seq, off = self._read_cursor(sorted(self._sizes))
            if seq not in self._sizes:
                seq, off = min(self._sizes), 0
            self._close_reader()
            self._rseq, self._roff = seq, off
            self._unread = self._pending

    def commit(self, batch: Batch) -> None:
        """Mark everything up to ``batch.end`` delivered: persist the cursor, delete finished segments."""
        with self._cond:
            if self._closed:
                return
            seq, off = batch.end
            if (seq, off) == (self._wseq, self._sizes[self._wseq]) and not self._unread \
                    and off >= self.segment_bytes // 4:
                # caught up with the writer: start a fresh segment so this one (all delivered) can go
                self._rotate(sync=False)
                self._close_reader()
                seq, off = self._rseq, self._roff = self._wseq, 0
            self._pending -= len(batch.lines)
            for old in [s for s in self._sizes if s < seq]:   # first: frees space even on a full disk
                with contextlib.suppress(OSError):
                    (self.dir / _seg_name(old)).unlink(missing_ok=True)
                del self._sizes[old]
            tmp = self.dir / "cursor.tmp"
            try:
                tmp.write_text(f"{seq} {off}\n")
                os.replace(tmp, self.dir / "cursor")
            except OSError:
                pass  # the next commit writes it; a restart before then sends this batch again (at least once)

    # state --------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events appended and not yet delivered."""
        return self._pending

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk (delivered lines in the head segment included)."""
        with self._cond:  # read by the metrics scrape while the intake and sender threads change the map
            return sum(self._sizes.values())

    def close(self) -> None:
        """Flush and sync what was written; the files stay for the next start."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            with contextlib.suppress(OSError):
                os.fsync(self._wfd)
            os.close(self._wfd)
            self._close_reader()
            os.close(self._lock_fd)
