"""Open-loop HTTP/1.1 load generator for bench/proxy.py.

Requests leave on a fixed schedule (``rate`` per second) whatever the server does, and latency is
measured from the *scheduled* send time, so a server that stalls is charged for the queue it causes
(no coordinated omission, unlike a closed-loop tool such as wrk). Connections are keep-alive; when none
is idle at a send time a new one is opened (its connect time counts in the latency), up to a cap, after
which requests wait in a queue (still timed from their schedule).

Timing: a periodic Linux ``timerfd`` (nanosecond resolution) wakes the event loop at each send time.
asyncio's own timers round poll timeouts up to whole milliseconds, which would add up to 1 ms of
generator lateness to every request. The generator reports its own send lag (actual - scheduled) so a
run where it could not keep up is visible; proxy.py checks it against the direct upstream.

Run as a script (proxy.py pins it to the load core); prints one JSON object::

    python bench/_loadgen.py --port 8080 --rate 1000 --duration 5 --requests reqs.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import sys
import time
from typing import Any

import numpy as np

_CLOCK_MONOTONIC = 1  # time.monotonic_ns() reads the same clock on Linux
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class PeriodicTimer:
    """A timerfd firing every ``period_ns`` from the absolute monotonic time ``start_ns``."""

    def __init__(self, start_ns: int, period_ns: int) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        spec = _Itimerspec(
            _Timespec(period_ns // 1_000_000_000, period_ns % 1_000_000_000),
            _Timespec(start_ns // 1_000_000_000, start_ns % 1_000_000_000),
        )
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def drain(self) -> None:
        """Acknowledge expirations so the fd stops being readable."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


def build_requests(spec: dict[str, Any], host: str, port: int) -> tuple[list[bytes], list[bytes]]:
    """Pre-encoded request heads (one per API key) and tails (one per body, with its own headers).

    Request n = head[n % K] + tail[n % B].
    """
    path = spec["path"]
    heads = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nX-API-Key: {key}\r\n"
        ).encode()
        for key in spec["keys"]
    ]
    tails = []
    extra = spec.get("headers") or [{} for _ in spec["bodies"]]
    for body, headers in zip(spec["bodies"], extra, strict=True):
        raw = body.encode()
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        tails.append(f"{lines}Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return heads, tails


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, gen: OpenLoop) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.inflight: int | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass it

    def send(self, idx: int) -> None:
        assert self.transport is not None
        self.inflight = idx
        self.gen.sent_at[idx] = time.monotonic_ns()
        self.transport.write(self.gen.request(idx))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.inflight is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            status = int(head[9:12])
            pos = head.find(b"\r\ncontent-length:")
            if pos >= 0:
                stop = head.find(b"\r\n", pos + 2)
                total = end + 4 + int(head[pos + 17 : stop if stop >= 0 else len(head)])
            elif b"transfer-encoding: chunked" in head:
                last = self.buf.find(b"\r\n0\r\n\r\n", end)
                if last < 0 and self.buf[end + 4 : end + 9] != b"0\r\n\r\n":
                    return
                total = end + 9 if last < 0 else last + 7
            else:  # body delimited by close: not expected from any server under test
                total = -1
            if total < 0 or len(self.buf) < total:
                if total < 0:
                    self.gen.fail(self)
                    self.close()
                return
            del self.buf[:total]
            keep = b"\r\nconnection: close" not in head
            self.gen.done(self, status, time.monotonic_ns(), keep)
            if not keep:
                self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gen.lost(self)


class OpenLoop:
    """Sends ``rate * duration`` requests on schedule and records when each answer arrived."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        heads: list[bytes],
        tails: list[bytes],
        rate: float,
        duration: float,
        max_conns: int,
        initial_conns: int,
        drain: float,
        offset: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.offset = offset
        self.heads, self.tails = heads, tails
        self.period_ns = round(1e9 / rate)
        self.total = int(rate * duration)
        self.max_conns, self.initial_conns, self.drain_s = max_conns, initial_conns, drain
        self.start_ns = 0
        self.sent = 0
        self.answered = 0
        self.sent_at = np.zeros(self.total, dtype=np.int64)
        self.done_at = np.zeros(self.total, dtype=np.int64)
        self.status = np.zeros(self.total, dtype=np.int16)
        self.idle: list[_Conn] = []
        self.backlog: collections.deque[int] = collections.deque()
        self.conns = 0
        self.peak_conns = 0
        self.connect_errors = 0
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.timer: PeriodicTimer | None = None
        self.tick_lag: list[int] = []

    def request(self, idx: int) -> bytes:
        n = idx + self.offset
        return self.heads[n % len(self.heads)] + self.tails[n % len(self.tails)]

    async def _open(self) -> _Conn | None:
        self.conns += 1
        self.peak_conns = max(self.peak_conns, self.conns)
        try:
            _, proto = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.conns -= 1
            self.connect_errors += 1
            return None
        return proto

    async def _open_and_send(self, idx: int) -> None:
        conn = await self._open()
        if conn is None:
            self._finish_one(idx, -1, time.monotonic_ns())
            return
        conn.send(idx)

    async def run(self) -> None:
        for _ in range(self.initial_conns):
            conn = await self._open()
            if conn is not None:
                self.idle.append(conn)
        self.start_ns = time.monotonic_ns() + 20_000_000
        self.timer = PeriodicTimer(self.start_ns, self.period_ns)
        self.loop.add_reader(self.timer.fd, self._tick)
        try:
            await self.finished
        finally:
            for conn in list(self.idle):
                conn.close()

    def scheduled(self, idx: int) -> int:
        return self.start_ns + idx * self.period_ns

    def _tick(self) -> None:
        assert self.timer is not None
        self.timer.drain()
        now = time.monotonic_ns()
        due = min(self.total, (now - self.start_ns) // self.period_ns + 1)
        if due > self.sent:  # how late the generator itself woke for the oldest request now due
            self.tick_lag.append(now - self.scheduled(self.sent))
        while self.sent < due:
            self._dispatch(self.sent)
            self.sent += 1
        if self.sent >= self.total:
            self.loop.remove_reader(self.timer.fd)
            self.timer.close()
            self.loop.call_later(self.drain_s, self._resolve)

    def _dispatch(self, idx: int) -> None:
        if self.idle:
            self.idle.pop().send(idx)
        elif self.conns < self.max_conns:
            self.loop.create_task(self._open_and_send(idx))
        else:
            self.backlog.append(idx)

    def _finish_one(self, idx: int, status: int, now: int) -> None:
        self.done_at[idx] = now
        self.status[idx] = status
        self.answered += 1
        if self.answered >= self.total:
            self._resolve()

    def done(self, conn: _Conn, status: int, now: int, keep: bool) -> None:
        idx = conn.inflight
        assert idx is not None
        conn.inflight = None
        self._finish_one(idx, status, now)
        if not keep:
            return
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def fail(self, conn: _Conn) -> None:
        if conn.inflight is not None:
            idx, conn.inflight = conn.inflight, None
            self._finish_one(idx, -1, time.monotonic_ns())

    def lost(self, conn: _Conn) -> None:
        self.fail(conn)
        self.conns -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if self.backlog and not self.finished.done():
            self.loop.create_task(self._open_and_send(self.backlog.popleft()))

    def _resolve(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def summary(self, warmup: float) -> dict[str, Any]:
        """Figures over requests scheduled after ``warmup`` seconds.

        Latency covers every answer (a 403 or 429 from the guard is an answer); a request that got no
        answer (connection error, or none within the drain time) counts as infinitely late, so an
        overloaded target shows ``inf`` percentiles instead of flattering ones.
        """
        first = min(self.total, int(warmup * 1e9 / self.period_ns))
        idx = np.arange(first, self.total)
        sched = self.start_ns + idx * self.period_ns
        sent, done, status = self.sent_at[first:], self.done_at[first:], self.status[first:]
        answered = (done > 0) & (status > 0)
        ok = answered & (status >= 200) & (status < 300)
        lat_ms = np.where(answered, (done - sched) / 1e6, np.inf)
        svc_ms = (done[answered] - sent[answered]) / 1e6
        lag_ms = (sent[sent > 0] - sched[sent > 0]) / 1e6
        tick_ms = np.asarray(self.tick_lag, dtype=np.float64) / 1e6
        codes, counts = np.unique(status[answered], return_counts=True)
        sends = np.sort(sent[sent > 0])
        send_window = (sends[-1] - sends[0]) / 1e9 if sends.size > 1 else 0.0
        return {
            "rate": 1e9 / self.period_ns,
            "measured": int(idx.size),
            "ok": int(ok.sum()),
            "statuses": {str(int(c)): int(n) for c, n in zip(codes, counts, strict=True)},
            "failed": int((~answered).sum()),
            "achieved_send_rate": (sends.size - 1) / send_window if send_window > 0 else 0.0,
            "p50_ms": nearest_rank(lat_ms, 50),
            "p90_ms": nearest_rank(lat_ms, 90),
            "p99_ms": nearest_rank(lat_ms, 99),
            "p999_ms": nearest_rank(lat_ms, 99.9),
            "max_ms": float(lat_ms.max()) if lat_ms.size else None,
            "service_p50_ms": nearest_rank(svc_ms, 50),
            "service_p99_ms": nearest_rank(svc_ms, 99),
            "send_lag_p99_ms": nearest_rank(lag_ms, 99),
            "timer_lag_p50_ms": nearest_rank(tick_ms, 50),
            "timer_lag_p99_ms": nearest_rank(tick_ms, 99),
            "timer_lag_max_ms": float(tick_ms.max()) if tick_ms.size else None,
            "peak_conns": self.peak_conns,
            "connect_errors": self.connect_errors,
        }


def nearest_rank(values: np.ndarray, q: float) -> float | None:
    """The q-th percentile by the nearest-rank definition (an observed value; ``inf`` stays ``inf``)."""
    if values.size == 0:
        return None
    ordered = np.sort(values)
    return float(ordered[max(0, int(np.ceil(q / 100.0 * ordered.size)) - 1)])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of sending")
    p.add_argument("--warmup", type=float, default=0.5, help="leading seconds left out of the figures")
    p.add_argument("--requests", required=True, help="JSON file: {path, keys: [...], bodies: [...], headers: [...]}")
    p.add_argument("--max-conns", type=int, default=512)
    p.add_argument("--initial-conns", type=int, default=32)
    p.add_argument(
        "--offset", type=int, default=0, help="start at this request of the pool's sequence (continue a session)"
    )
    p.add_argument("--drain", type=float, default=3.0, help="seconds to wait for answers after the last send")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    heads, tails = build_requests(spec, args.host, args.port)
    gen = OpenLoop(
        host=args.host,
        port=args.port,
        heads=heads,
        tails=tails,
        rate=args.rate,
        duration=args.duration,
        max_conns=args.max_conns,
        initial_conns=args.initial_conns,
        drain=args.drain,
        offset=args.offset,
    )
    await gen.run()
    return gen.summary(args.warmup)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with open(args.requests) as fh:
        spec = json.load(fh)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_main(args, spec))
    else:
        result = uvloop.run(_main(args, spec))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
