"""StreamSink: the request path appends without waking the writer per event; nothing is lost or reordered."""

from __future__ import annotations

import io
import threading
import time

from guard_agent.events import StreamSink


class CountingStream(io.BytesIO):
    """A real in-memory stream that counts the writes the sink makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        with self._lock:
            self.writes += 1
            return super().write(data)


def wait_for_lines(stream: CountingStream, n: int, timeout: float = 5.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = stream.getvalue().splitlines()
        if len(lines) >= n:
            return lines
        time.sleep(0.005)
    return stream.getvalue().splitlines()


class TestStreamSink:
    def test_an_idle_writer_is_woken_by_one_event(self) -> None:
        """A single event after a quiet spell is written promptly (well within the 1 s backstop)."""
        stream = CountingStream()
        sink = StreamSink(stream)
        for i in range(3):
            time.sleep(0.05)  # the writer goes idle between events
            started = time.monotonic()
            sink.write(b"e%d" % i)
            assert wait_for_lines(stream, i + 1, timeout=0.5)[-1] == b"e%d" % i
            assert time.monotonic() - started < 0.5
        sink.close()

    def test_a_burst_is_written_in_few_batches_in_order(self) -> None:
        """5,000 events from 4 threads: all written, each thread's in its order, in batches."""
        stream = CountingStream()
        sink = StreamSink(stream)

        def produce(t: int) -> None:
            for i in range(1250):
                assert sink.write(b"%d:%d" % (t, i))
                if i % 100 == 0:
                    time.sleep(0.001)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        lines = wait_for_lines(stream, 5000)
        sink.close()
        assert len(lines) == 5000
        for t in range(4):
            mine = [int(x.split(b":")[1]) for x in lines if x.startswith(b"%d:" % t)]
            assert mine == list(range(1250))
        assert stream.writes < 2500  # batched: far fewer writes than events

    def test_close_writes_everything_queued(self) -> None:
        """Events queued just before close are all written by it."""
        stream = CountingStream()
        sink = StreamSink(stream, linger=0.2)
        for i in range(1000):
            sink.write(b"x%d" % i)
        sink.close()
        assert stream.getvalue().splitlines() == [b"x%d" % i for i in range(1000)]
