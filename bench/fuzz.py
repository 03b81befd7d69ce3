"""Raw-socket fuzz harness: >= 100,000 malformed or adversarial requests against a real `guard-agent run`.

Not in CI. Starts the built-in digits model and a guard (see bench/soak.py), then
many concurrent workers open raw TCP connections and send, from a seeded
generator: garbage bytes, broken request lines and headers, oversize heads and
bodies, conflicting framing (CL+TE, bad chunk sizes, bare LF/CR), mutated JSON
(truncation, byte flips, deep nesting, huge numbers, NaN, duplicate keys,
wrong types), path variants, protocol confusion (TLS ClientHello, HTTP/2
preface, Upgrade), pipelined bursts, abrupt disconnects and slowloris-style
dribbles, and hostile values (``hostile``: values beyond float32 in every
numeric path, Expect, non-ASCII credentials, listed Content-Encoding, Connection
naming Content-Type, repeated binary header lengths, INT64 extremes, HTTP/2.0
request lines, query strings, rotating keys, half-closed clients). Every 40th
operation is a good request whose answer is checked.

Reports: guard crashes (must be 0), hangs (a connection neither answered nor
closed within the deadline: 0), 5xx produced by the guard itself (0), status
counts, RSS before/after and its growth per request in each pass, live sessions
after each pass (every good request, and every scored request carrying the
random-key trick, is a new client), open connections left, and good requests
answered correctly. Growth that goes on pass after pass with no new sessions is a
leak; new sessions cost about 9 KB each up to ``GUARD_SESSION_MAX``.

    python -m bench.fuzz [--requests 100000] [--workers 48] [--passes 1] [--seed 0] [--json out.json]
                         [--cases headers ...] [--no-profile] [--guard-env GUARD_SESSION_MAX=1000 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import random
import re
import struct
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.soak import Stack, rss_kib, start_stack

__all__ = ["CASES", "Op", "main"]

HOST = b"Host: guard\r\n"
INFER = b"/v2/models/digits/infer"
DEADLINE = 12.0          # seconds an operation may take before it counts as a hang
READ_TIMEOUT = "3"       # GUARD_CLIENT_READ_TIMEOUT for the fuzzed guard: slow cases resolve quickly


@dataclass
class Op:
    """What one connection sends: pieces (with pauses between them), how many requests, how it ends."""

    name: str
    pieces: list[bytes]
    requests: int = 1
    pause: float = 0.0
    abort: bool = False          # close right after sending, do not wait for an answer
    half_close: bool = False     # shut down the write side after sending, then read the answer
    source: str | None = None    # the loopback address to connect from (None: 127.0.0.1)
    good: bool = False           # a well-formed request whose answer must be 200 with outputs
    expect_answer: bool = True


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    by_case: Counter[str] = field(default_factory=Counter)
    guard_5xx: Counter[str] = field(default_factory=Counter)
    hangs: list[str] = field(default_factory=list)
    requests: int = 0
    operations: int = 0
    good_total: int = 0
    good_ok: int = 0
    good_failures: Counter[str] = field(default_factory=Counter)


def _v2(rows: list[list[float]]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                                     "data": [v for r in rows for v in r]}],
                         "outputs": [{"name": "predict_proba"}]})


def _post(body: bytes, *, path: bytes = INFER, extra: bytes = b"", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (b"POST " + path + b" HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
            + b"Content-Length: " + str(n).encode() + b"\r\n" + extra + b"\r\n" + body)


def _chunked(body: bytes, rng: random.Random, *, extra: bytes = b"") -> bytes:
    out = b""
    i = 0
    while i < len(body):
        n = rng.randint(1, 64)
        out += b"%x\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n])
        i += n
    return (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
            + b"Transfer-Encoding: chunked\r\n" + extra + b"\r\n" + out + b"0\r\n\r\n")


class Gen:
    """Seeded case generators; each returns an Op."""

    def __init__(self, rng: random.Random, rows: list[list[float]]) -> None:
        self.rng = rng
        self.rows = rows

    def row(self) -> list[float]:
        return self.rng.choice(self.rows)

    def good(self) -> Op:
        # a session of its own, so the fuzz traffic's throttling (one client address) does not apply to it: a new
        # key alone does not buy one (unverified keys also count against their client address), so
        # good requests come from other loopback addresses, each client ten or so requests
        key = b"X-API-Key: good-" + self.rng.randbytes(12).hex().encode() + b"\r\n"
        return Op("good", [_post(_v2([self.row()]), extra=key)], good=True,
                  source=f"127.0.{self.rng.randint(1, 255)}.{self.rng.randint(2, 254)}")

    def garbage(self) -> Op:
        return Op("garbage", [self.rng.randbytes(self.rng.randint(1, 4096))])

    def request_line(self) -> Op:
        r = self.rng
        lines = [b"GET", b"POST /v2 HTTP/9.9", b"P\x00ST / HTTP/1.1", b"POST " + b"/a" * 9000 + b" HTTP/1.1",
                 b"POST  /v2/models/digits/infer  HTTP/1.1", b"POST /v2/models/digits/infer HTTP/1.1 extra",
                 b"\r\n\r\nPOST /v2 HTTP/1.1", b"POST /v2/\x7fmodels HTTP/1.1", b"HTTP/1.1 200 OK",
                 b"POST /v2/models/digits/infer HTTP/1.", b"POST /v2/models/digits/infer http/1.1",
                 bytes(r.randint(33, 126) for _ in range(r.randint(1, 40))) + b" / HTTP/1.1"]
        return Op("request_line", [r.choice(lines) + b"\r\n" + HOST + b"\r\n"])

    def headers(self) -> Op:
        r = self.rng
        body = _v2([self.row()])
        tricks = [b"NoColonHere\r\n", b"X-Space : v\r\n", b"X-Fold: a\r\n  folded\r\n", b"X-Nul: a\x00b\r\n",
                  b"Content-Length: 5\r\nContent-Length: 7\r\n", b"Content-Length: -1\r\n",
                  b"Content-Length: +12\r\n", b"Content-Length: 0x10\r\n", b"Content-Length: 99999999999999999999\r\n",
                  b": empty-name\r\n", b"X-Big: " + b"v" * 40000 + b"\r\n",
                  b"".join(b"X-H%d: v\r\n" % i for i in range(300)), b"Host: a\r\nHost: b\r\n",
                  b"X-Request-Id: " + r.randbytes(60) + b"\r\n", b"Content-Type: \xff\xfe\r\n",
                  b"X-API-Key: " + r.randbytes(30).hex().encode() + b"\r\n",
                  b"Authorization: Bearer " + b"e" * 20000 + b"\r\n", b"Expect: 100-continue\r\n",
                  b"Connection: Content-Length, close\r\n", b"Inference-Header-Content-Length: 12\r\n",
                  b"Inference-Header-Content-Length: -5\r\n", b"Content-Encoding: gzip\r\n"]
        extra = b"".join(r.sample(tricks, r.randint(1, 3)))
        head = b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n" + extra
        if b"Content-Length" not in extra:
            head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        return Op("headers", [head + b"\r\n" + body])

    def body_size(self) -> Op:
        r = self.rng
        body = _v2([self.row()])
        kind = r.randrange(4)
        if kind == 0:  # announced far over the limit; a little sent
            return Op("oversize_announced", [_post(b"x" * 65536, length=64 * 1024 * 1024)])
        if kind == 1:  # over the limit for real
            return Op("oversize_sent", [_post(b"[" + b"1," * (2_200_000) + b"1]")])
        if kind == 2:  # shorter than announced, then the client leaves
            return Op("truncated_abort", [_post(body[: len(body) // 2], length=len(body))], abort=True)
        return Op("longer_than_announced", [_post(body + b"GARBAGE / HTTP/1.1\r\n\r\n", length=len(body))],
                  requests=2)

    def chunked(self) -> Op:
        r = self.rng
        body = _v2([self.row()])
        variants = [
            _chunked(body, r),
            _chunked(body, r, extra=b"Content-Length: 3\r\n"),
            _chunked(body, r).replace(b"\r\n", b"\n"),
            _chunked(body, r).replace(b"0\r\n\r\n", b"0\r\nX-Trailer: t\r\n\r\n"),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
             b"fffffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n"),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
             b"zz\r\n" + body + b"\r\n0\r\n\r\n"),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
             b"5;ext=" + b"e" * 9000 + b"\r\nabcde\r\n0\r\n\r\n"),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, identity\r\n\r\n"
             + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding:\tchunked\r\n\r\n"
             + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)),
            (b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
             + b"%x\r\n%sXX0\r\n\r\n" % (len(body), body)),
        ]
        return Op("chunked", [r.choice(variants)])

    def json(self) -> Op:
        r = self.rng
        body = bytearray(_v2([self.row() for _ in range(r.randint(1, 4))]))
        kind = r.randrange(10)
        if kind == 0:
            data = bytes(body[: r.randrange(len(body))])
        elif kind == 1:
            for _ in range(r.randint(1, 8)):
                body[r.randrange(len(body))] = r.randrange(256)
            data = bytes(body)
        elif kind == 2:
            depth = r.choice([10, 33, 100, 5000])
            data = b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": ' + b"[" * depth + b"1" \
                + b"]" * depth + b"}]}"
        elif kind == 3:
            num = r.choice([b"1e999", b"-1e999", b"NaN", b"Infinity", b"1" * 5000, b"0x10", b"1.7976931348623157e309"])
            data = b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64", "data": [' + \
                b",".join([num] * 64) + b"]}]}"
        elif kind == 4:
            data = b'{"inputs": [], "inputs": [{"name": "x"}]}'
        elif kind == 5:
            typ = r.choice([b'"BYTES"', b'"FP16"', b'"BOOL"', b'"nope"', b"7", b"null"])
            data = bytes(body).replace(b'"FP64"', typ)
        elif kind == 6:
            shape = r.choice([b"[-1, 64]", b"[1e12, 64]", b"[0, 64]", b"[2, 32]", b"[]", b"[1, 1, 1, 1, 1, 64]",
                              b"[9999999999, 9999999999]", b'"64"'])
            data = re.sub(rb'"shape":\[[^\]]*\]', b'"shape":' + shape, bytes(body), count=1)
        elif kind == 7:
            data = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64",
                                             "data": [[r.random()] * 8] * 4 + [1]}]})
        elif kind == 8:
            data = ("{\"inputs\": [{\"name\": \"" + "".join(chr(r.randint(0x80, 0x10FFFF)) for _ in range(50))
                    .encode("utf-8", "surrogatepass").decode("utf-8", "replace") + "\"}]}").encode()
        else:
            data = r.choice([b"", b"null", b"[]", b"{}", b'"str"', b"{\"inputs\": {}}", b"\xef\xbb\xbf{}",
                             b"{\"instances\": [[1, 2]]}", b"\x00" * 100])
        path = r.choice([INFER, b"/v1/models/digits:predict", b"/invocations"])
        return Op("json", [_post(data, path=path)])

    def path(self) -> Op:
        r = self.rng
        paths = [b"/v2/models/digits/infer/", b"/v2/models/digits/infer%2F", b"/v2/models%2Fdigits/infer",
                 b"/v2/models/../models/digits/infer", b"/V2/models/digits/infer", b"//v2/models/digits/infer",
                 b"/v2/models/digits/infer;a=b", b"/v2/models/digits/infer?x=" + b"a" * 5000,
                 b"/v2/repository/models/digits/unload", b"/v2/models/digits/%2e%2e/infer", b"*",
                 b"http://evil/v2/models/digits/infer", b"/v2/models/" + b"d" * 3000 + b"/infer",
                 b"/%00", b"/v2/models/digits/infer\\..\\x", b"/v2/models/\xc3\xa9/infer",
                 b"/" + bytes(r.choice(b"abc%/.;\\~") for _ in range(r.randint(1, 60)))]
        method = r.choice([b"POST", b"GET", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT", b"PATCH", b"HEAD"])
        body = _v2([self.row()])
        return Op("path", [method + b" " + r.choice(paths) + b" HTTP/1.1\r\n" + HOST
                           + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                           + b"\r\n\r\n" + body])

    def protocol(self) -> Op:
        r = self.rng
        variants = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + r.randbytes(200),  # a TLS ClientHello on plain HTTP
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + r.randbytes(50),
            b"GET /v2/health/ready HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            b"GET /v2/health/ready HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"GET /v2/health/ready HTTP/1.0\r\n\r\n",
            b"GET /v2/health/ready\r\n\r\n",
            b"POST " + INFER + b" HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        ]
        i = r.randrange(len(variants))
        return Op("protocol", [variants[i]], abort=i == len(variants) - 1)

    def pipeline(self) -> Op:
        r = self.rng
        n = r.randint(2, 20)
        parts = []
        for _ in range(n):
            parts.append(r.choice([_post(_v2([self.row()])), _post(b"{bad json"),
                                   b"GET /v2/health/ready HTTP/1.1\r\n" + HOST + b"\r\n",
                                   b"GET /nope HTTP/1.1\r\n" + HOST + b"\r\n"]))
        return Op("pipeline", [b"".join(parts)], requests=n)

    def disconnect(self) -> Op:
        r = self.rng
        full = _post(_v2([self.row()]))
        return Op("disconnect", [full[: r.randrange(1, len(full))]], abort=True)

    def hostile(self) -> Op:
        """Hostile values: beyond float32 in every numeric path, Expect with a whole body,
        credentials that are not ASCII, listed or repeated Content-Encoding, a Connection header naming
        Content-Type, a repeated or non-numeric binary header length, INT64 extremes, an HTTP/2.0 request line,
        a query string on a scored route, a fresh key per request, and a client that half-closes."""
        r = self.rng
        row = list(self.row())
        row[r.randrange(len(row))] = r.choice([3.4028236e38, -3.4028236e38, 1e300, 1.7976931348623157e308])
        tensor = struct.pack(f"<{len(row)}d", *row)
        header = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, len(row)], "datatype": "FP64",
                                           "parameters": {"binary_data_size": len(tensor)}}]})
        plain = _v2([self.row()])
        kind = r.randrange(14)
        if kind == 0:
            return Op("hostile", [_post(_v2([row]))])
        if kind == 1:
            return Op("hostile", [_post(header + tensor, extra=b"Inference-Header-Content-Length: %d\r\n"
                                        % len(header))])
        if kind == 2:
            return Op("hostile", [_post(orjson.dumps({"instances": [row]}), path=b"/v1/models/digits:predict")])
        if kind == 3:
            return Op("hostile", [_post(orjson.dumps({"dataframe_split": {"data": [row]}}), path=b"/invocations")])
        if kind == 4:
            return Op("hostile", [_post(plain, extra=b"Expect: 100-continue\r\n")])
        if kind == 5:
            name = r.choice([b"X-API-Key: ", b"Authorization: Bearer "])
            return Op("hostile", [_post(plain, extra=name + b"caf\xe9" + r.randbytes(4) + b"\r\n")])
        if kind == 6:
            extra = r.choice([b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
                              b"Content-Encoding: \r\nContent-Encoding: deflate\r\n",
                              b"Content-Encoding: identity, gzip\r\n"])
            return Op("hostile", [_post(plain, extra=extra)])
        if kind == 7:
            return Op("hostile", [_post(plain, extra=b"Connection: close, Content-Type\r\n")])
        if kind == 8:
            n = len(header)
            extra = r.choice([b"Inference-Header-Content-Length: %d\r\nInference-Header-Content-Length: 3\r\n" % n,
                              b"Inference-Header-Content-Length: abc\r\n"])
            return Op("hostile", [_post(header + tensor, extra=extra)])
        if kind == 9:
            data = b'{"inputs":[{"name":"input-0","shape":[1,2],"datatype":"INT64","data":[9223372036854775807,' \
                   b'-9223372036854775808]}]}'
            return Op("hostile", [_post(data)])
        if kind == 10:
            return Op("hostile", [_post(plain).replace(b" HTTP/1.1\r\n", b" HTTP/2.0\r\n", 1)])
        if kind == 11:
            return Op("hostile", [_post(plain, path=INFER + b"?/../../repository/models/digits/unload")])
        if kind == 12:
            return Op("hostile", [_post(plain, extra=b"X-API-Key: k-" + r.randbytes(8).hex().encode() + b"\r\n")])
        return Op("hostile", [_post(plain)], half_close=True)

    def slow(self) -> Op:
        full = _post(_v2([self.row()]))
        cut = self.rng.randrange(10, 60)
        pieces = [full[:cut]] + [full[i:i + 1] for i in range(cut, cut + 40)]
        return Op("slowloris", pieces, pause=0.25)


CASES: list[tuple[str, float]] = [("garbage", 8), ("request_line", 8), ("headers", 14), ("body_size", 3),
                                  ("chunked", 12), ("json", 25), ("path", 12), ("protocol", 4), ("pipeline", 6),
                                  ("disconnect", 6), ("slow", 0.05), ("hostile", 10)]


def _complete_answers(data: bytes, bodies: bool = True) -> int:
    """How many whole responses (Content-Length framed, as the guard answers) the buffer holds.

    Answers to HEAD carry a Content-Length but no body (``bodies=False``)."""
    count, pos = 0, 0
    while True:
        head_end = data.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return count
        length = 0
        for line in data[pos:head_end].split(b"\r\n") if bodies else ():
            if line.lower().startswith(b"content-length:"):
                try:
                    length = int(line.split(b":", 1)[1])
                except ValueError:
                    length = 0
        if len(data) < head_end + 4 + length:
            return count
        count += 1
        pos = head_end + 4 + length


async def _read_answers(reader: asyncio.StreamReader, deadline: float, expected: int,
                        bodies: bool = True) -> tuple[bytes, bool]:
    """Read until ``expected`` answers arrived or the guard closed; (data, closed). Stops at the deadline."""
    data = b""
    loop = asyncio.get_running_loop()
    while _complete_answers(data, bodies) < expected:
        left = deadline - loop.time()
        if left <= 0:
            return data, False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return data, False
        except (ConnectionError, OSError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _statuses(data: bytes) -> list[int]:
    out = []
    for line in data.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            out.append(int(line[9:12]))
    return out


def _guard_made(data: bytes, status: int) -> bool:
    """True when a 5xx answer carries the guard's own JSON error (not a model's error passed through)."""
    idx = data.find(b"HTTP/1.1 %d" % status)
    segment = data[idx: idx + 4096]
    return b'{"error":{"code"' in segment


async def _run_op(op: Op, port: int, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=(op.source, 0) if op.source else None), 5)
    except (OSError, TimeoutError):
        tally.statuses["connect_failed"] += 1
        return
    try:
        for i, piece in enumerate(op.pieces):
            if i and op.pause:
                await asyncio.sleep(op.pause)
            writer.write(piece)
            await writer.drain()
        if op.good:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                body = await asyncio.wait_for(reader.readexactly(length), DEADLINE)
                status = _statuses(head)[0]
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, StopIteration, ValueError) as exc:
                tally.good_failures[type(exc).__name__] += 1
                return
            tally.statuses[str(status)] += 1
            if status == 200 and b'"outputs"' in body:
                tally.good_ok += 1
            else:
                tally.good_failures[f"status {status}"] += 1
            return
        if op.abort:
            writer.transport.abort()
            tally.statuses["client_aborted"] += 1
            return
        if op.half_close and writer.can_write_eof():
            writer.write_eof()
        bodies = not op.pieces[0].startswith(b"HEAD ")
        data, closed = await _read_answers(reader, loop.time() + DEADLINE, op.requests, bodies)
        if not closed and _complete_answers(data, bodies) == 0:
            tally.hangs.append(op.name)  # neither answered nor closed
            return
        found = _statuses(data)
        if not found:
            tally.statuses["closed_without_answer"] += 1
        for status in found:
            tally.statuses[str(status)] += 1
            if status >= 500 and _guard_made(data, status):
                tally.guard_5xx[f"{op.name}:{status}"] += 1
    except (ConnectionError, OSError):
        tally.statuses["reset_by_guard"] += 1
    finally:
        writer.transport.abort()


async def _fuzz(stack: Stack, *, requests: int, workers: int, seed: int,
                cases: list[str] | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    gen = Gen(rng, [[float(v) for v in row] for row in stack.x_test])
    names, weights = zip(*[(n, w) for n, w in CASES if not cases or n in cases], strict=True)
    makers: dict[str, Callable[[], Op]] = {n: getattr(gen, n) for n in names}
    port = int(stack.guard_url.rsplit(":", 1)[1])
    tally = Tally()
    queue: asyncio.Queue[Op | None] = asyncio.Queue(maxsize=workers * 4)

    async def worker() -> None:
        while (op := await queue.get()) is not None:
            await _run_op(op, port, tally)

    async def alive_check() -> None:
        while True:
            await asyncio.sleep(2)
            if stack.guard.poll() is not None:
                raise RuntimeError(f"guard exited with {stack.guard.returncode}")

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    checker = asyncio.create_task(alive_check())
    started = time.monotonic()
    last_report = started
    while tally.requests < requests:
        op = gen.good() if tally.operations % 40 == 0 else makers[rng.choices(names, weights)[0]]()
        if op.good:
            tally.good_total += 1
        tally.operations += 1
        tally.requests += op.requests
        tally.by_case[op.name] += op.requests
        await queue.put(op)
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            print(f"  {tally.requests} requests sent, {time.monotonic() - started:.0f}s, "
                  f"hangs={len(tally.hangs)} guard_5xx={sum(tally.guard_5xx.values())}", file=sys.stderr)
    for _ in tasks:
        await queue.put(None)
    await asyncio.gather(*tasks)
    checker.cancel()
    elapsed = time.monotonic() - started
    return {"requests": tally.requests, "operations": tally.operations, "seconds": round(elapsed, 1),
            "requests_per_second": round(tally.requests / elapsed), "by_case": dict(tally.by_case),
            "statuses": dict(sorted(tally.statuses.items())), "hangs": len(tally.hangs),
            "hang_cases": dict(Counter(tally.hangs)), "guard_5xx": dict(tally.guard_5xx),
            "good": {"sent": tally.good_total, "answered_correctly": tally.good_ok,
                     "failures": dict(tally.good_failures)}}


def _metric(admin_url: str, name: str) -> dict[str, float]:
    """Every sample of one metric family from the admin port, keyed by its label set."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith((name + " ", name + "{")):
                key, _, value = line.rpartition(" ")
                out[key[len(name):] or "value"] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=int, default=1,
                   help="repeat on the same guard (RSS after each pass tells a high-water mark from a leak)")
    p.add_argument("--cases", nargs="*", help=f"only these cases, of: {' '.join(n for n, _ in CASES)}")
    p.add_argument("--no-profile", action="store_true", help="built-in checks only (no detectors or trackers)")
    p.add_argument("--guard-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the guard, e.g. GUARD_SESSION_MAX=1000 (repeatable)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.guard_env)
    with start_stack(profile=not args.no_profile,
                     env={"GUARD_CLIENT_READ_TIMEOUT": READ_TIMEOUT, "GUARD_LOG_SAMPLE_ALLOW": "0", **extra}) as stack:
        rss = [rss_kib(stack.guard.pid)]
        passes = []
        for i in range(args.passes):
            passes.append(asyncio.run(_fuzz(stack, requests=args.requests, workers=args.workers,
                                            seed=args.seed + i, cases=args.cases)))
            time.sleep(2)
            if stack.guard.poll() is not None:
                break
            rss.append(rss_kib(stack.guard.pid))
            passes[-1]["rss_growth_bytes_per_request"] = round((rss[-1] - rss[-2]) * 1024 / passes[-1]["requests"])
            passes[-1]["active_sessions_after"] = _metric(stack.admin_url, "inference_guard_active_sessions")
        alive = stack.guard.poll() is None
        result: dict[str, Any] = passes[0] if len(passes) == 1 else {"passes": passes}
        result["rss_kib"] = {"before": rss[0], "after_each_pass": rss[1:]}
        result["guard_crashed"] = not alive
        if alive:
            result["open_connections_after"] = _metric(stack.admin_url, "inference_guard_open_connections")
            result["refused_connections"] = _metric(stack.admin_url, "inference_guard_connections_refused_total")
            # from an address of its own: the fuzz traffic's address (127.0.0.1) is blocked and throttled by now,
            # and an unverified key does not escape that
            host, port = stack.guard_url.rsplit("/", 1)[1].split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=("127.0.9.9", 0))
            try:
                conn.request("POST", "/v2/models/digits/infer", body=orjson.dumps(
                    {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP64",
                                 "data": [float(v) for v in stack.x_test[0]]}]}),
                    headers={"Content-Type": "application/json", "X-API-Key": "after-fuzz"})
                result["good_request_after_fuzz"] = conn.getresponse().status
            finally:
                conn.close()
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    ok = not result["guard_crashed"] and result.get("good_request_after_fuzz") == 200 and len(passes) == args.passes \
        and all(
        r["hangs"] == 0 and not r["guard_5xx"] and r["good"]["answered_correctly"] == r["good"]["sent"]
        for r in passes)
    print("PASS" if ok else "FAIL", "(bar: 0 crashes, 0 hangs, 0 guard 5xx, every good request answered correctly)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
