"""The disk spool: FIFO across segments, at-least-once across restarts, bounded size, crash leftovers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard_agent.sinks import Appended, Batch, Spool, SpoolLockedError


def drain(spool: Spool, max_events: int = 1000) -> list[bytes]:
    out: list[bytes] = []
    while (batch := spool.read(max_events, 1 << 20, timeout=0)) is not None:
        out.extend(batch.lines)
        spool.commit(batch)
    return out


def lines(n: int, start: int = 0, size: int = 40) -> list[bytes]:
    return [f"event-{i:06d}-".encode().ljust(size, b"x") for i in range(start, start + n)]


class TestSpool:
    def test_fifo_across_segment_rotation(self, tmp_path: Path) -> None:
        """Lines come back in append order across many small segments; delivered segments are deleted."""
        spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
        data = lines(500)
        assert spool.append(data[:250]).written == 250
        first = spool.read(100, 1 << 20, timeout=0)
        assert first is not None and list(first.lines) == data[:100]
        spool.commit(first)
        assert spool.append(data[250:]).written == 250
        assert drain(spool, 77) == data[100:]
        assert spool.pending == 0
        assert len(list(tmp_path.glob("*.seg"))) <= 2
        spool.close()

    def test_uncommitted_lines_come_back_after_restart(self, tmp_path: Path) -> None:
        """A batch read but not committed (sink never acknowledged it) is read again by the next process."""
        spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=500)
        spool.append(lines(30))
        done = spool.read(10, 1 << 20, timeout=0)
        assert done is not None
        spool.commit(done)
        assert spool.read(10, 1 << 20, timeout=0) is not None   # in flight, never acknowledged
        spool.close()
        again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=500)
        assert again.recovered == 20
        assert drain(again) == lines(30)[10:]
        again.close()

    def test_size_limit_refuses_the_newest(self, tmp_path: Path) -> None:
        """Appends stop at max_bytes: the oldest lines are kept, append says how many fitted."""
        spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=8 * 1024)
        data = lines(3000, size=100)
        result = spool.append(data)
        written = result.written
        assert 0 < written < 3000 and result.reason == "spool_full"
        assert spool.size_bytes <= 64 * 1024
        assert spool.append(data[written:]).written == 0
        assert drain(spool) == data[:written]
        assert spool.append(data[written:written + 10]) == Appended(10, None), "space comes back once delivered"
        spool.close()

    @pytest.mark.parametrize("max_bytes", [64 * 1024, 1 << 20])
    def test_delivered_space_comes_back_with_default_segments(self, tmp_path: Path, max_bytes: int) -> None:
        """Fill to the bound, deliver everything, fill again: nearly the whole bound is usable every cycle."""
        spool = Spool(tmp_path, max_bytes=max_bytes)
        for cycle in range(3):
            data = lines(max_bytes // 100 + 10, start=cycle * 100_000, size=99)
            written = spool.append(data).written
            assert written >= 0.85 * max_bytes // 100, f"cycle {cycle}: only {written} lines fitted"
            assert drain(spool, 50) == data[:written]
            assert spool.size_bytes <= spool.segment_bytes
        spool.close()

    def test_torn_tail_is_cut(self, tmp_path: Path) -> None:
        """A partial last line (crash mid-write) is removed at start; complete lines are kept."""
        spool = Spool(tmp_path, max_bytes=1 << 20)
        spool.append(lines(5))
        spool.close()
        (segment,) = tmp_path.glob("*.seg")
        with segment.open("ab") as f:
            f.write(b'{"partial": tr')
        again = Spool(tmp_path, max_bytes=1 << 20)
        assert drain(again) == lines(5)
        again.close()

    def test_lines_with_newlines_stay_one_record(self, tmp_path: Path) -> None:
        """A line containing a newline cannot split into two records."""
        spool = Spool(tmp_path, max_bytes=1 << 20)
        spool.append([b"a\nb", b"c"])
        assert drain(spool) == [b"a b", b"c"]
        spool.close()

    def test_one_process_per_spool(self, tmp_path: Path) -> None:
        """A second Spool on a locked directory is refused; after close it can be opened."""
        spool = Spool(tmp_path, max_bytes=1 << 20)
        with pytest.raises(SpoolLockedError):
            Spool(tmp_path, max_bytes=1 << 20)
        spool.close()
        Spool(tmp_path, max_bytes=1 << 20).close()

    def test_read_waits_for_data(self, tmp_path: Path) -> None:
        """An empty spool returns None after the timeout instead of an empty batch."""
        spool = Spool(tmp_path, max_bytes=1 << 20)
        assert spool.read(10, 1000, timeout=0.05) is None
        spool.close()

    def test_oversized_line_still_reads_alone(self, tmp_path: Path) -> None:
        """A line bigger than the batch byte limit is returned on its own (batches never stall)."""
        spool = Spool(tmp_path, max_bytes=1 << 20)
        spool.append([b"x" * 5000, b"y"])
        batch = spool.read(10, 100, timeout=0)
        assert isinstance(batch, Batch) and batch.lines == (b"x" * 5000,)
        spool.close()


ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 40)),
    st.tuples(st.just("read"), st.integers(1, 30)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_at_least_once_in_order_under_any_interleaving(script: list[tuple[str, int]]) -> None:
    """Whatever mix of appends, reads, commits and restarts: the committed stream is exactly the appended lines
    in order, and after a restart reading resumes at the first uncommitted line."""
    with tempfile.TemporaryDirectory() as d:
        spool = Spool(d, max_bytes=1 << 22, segment_bytes=300)
        appended: list[bytes] = []
        delivered: list[bytes] = []
        in_flight: Batch | None = None
        for op, n in script:
            if op == "append":
                new = lines(n, start=len(appended), size=20)
                assert spool.append(new).written == n
                appended.extend(new)
            elif op == "read" and in_flight is None:
                in_flight = spool.read(n, 1 << 20, timeout=0)
                if in_flight is not None:
                    assert list(in_flight.lines) == appended[len(delivered):len(delivered) + len(in_flight.lines)]
            elif op == "commit" and in_flight is not None:
                spool.commit(in_flight)
                delivered.extend(in_flight.lines)
                in_flight = None
            elif op == "restart":
                spool.close()
                spool = Spool(d, max_bytes=1 << 22, segment_bytes=300)
                in_flight = None
                assert spool.recovered == len(appended) - len(delivered)
        if in_flight is not None:
            spool.commit(in_flight)
            delivered.extend(in_flight.lines)
        delivered.extend(drain(spool, 7))
        spool.close()
        assert delivered == appended
