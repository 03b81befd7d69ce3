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

import fcntl
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Batch", "Spool", "SpoolLockedError"]


class SpoolLockedError(OSError):
    """Another process holds this spool (two guards must not share a spool directory)."""


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
        self.segment_bytes = segment_bytes or max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 16))
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
        self._wfile = (self.dir / _seg_name(self._wseq)).open("ab")
        self._sizes.setdefault(self._wseq, 0)

    # writer side --------------------------------------------------------------------------------------
    def append(self, lines: Sequence[bytes]) -> int:
        """Append in order until the size limit; returns how many were written (the rest must be dropped).

        Raises OSError when the disk refuses the write (nothing of this call was written then).
        """
        written = 0
        with self._cond:
            if self._closed:
                return 0
            total = sum(self._sizes.values())
            chunks = []
            for line in lines:
                record = line.replace(b"\n", b" ") + b"\n"
                if total + len(record) > self.max_bytes:
                    break
                chunks.append(record)
                total += len(record)
                written += 1
            if not chunks:
                return 0
            data = b"".join(chunks)
            start = self._wfile.tell()
            try:
                self._wfile.write(data)
                self._wfile.flush()
            except OSError:
                self._wfile.truncate(start)
                raise
            self._sizes[self._wseq] += len(data)
            self._pending += written
            self._unread += written
            if self._sizes[self._wseq] >= self.segment_bytes:
                self._rotate()
            self._cond.notify_all()
        return written

    def _rotate(self) -> None:
        os.fsync(self._wfile.fileno())
        self._wfile.close()
        self._wseq += 1
        self._open_writer()

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
            tmp = self.dir / "cursor.tmp"
            tmp.write_text(f"{seq} {off}\n")
            os.replace(tmp, self.dir / "cursor")
            for old in [s for s in self._sizes if s < seq]:
                (self.dir / _seg_name(old)).unlink(missing_ok=True)
                del self._sizes[old]
            self._pending -= len(batch.lines)

    # state --------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events appended and not yet delivered."""
        return self._pending

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk (delivered lines in the head segment included)."""
        return sum(self._sizes.values())

    def close(self) -> None:
        """Flush and sync what was written; the files stay for the next start."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            try:
                self._wfile.flush()
                os.fsync(self._wfile.fileno())
            except OSError:
                pass
            self._wfile.close()
            self._close_reader()
            os.close(self._lock_fd)
