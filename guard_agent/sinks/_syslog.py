"""Syslog: RFC 5424 messages, octet-counted framing (RFC 6587 / RFC 5425), over TCP or TLS.

TCP syslog has no application acknowledgement, so "written to the socket" is not
"delivered": a receiver that dies with our bytes unread loses them. Two checks narrow
that window to what the receiver's kernel acknowledged: before a batch, a connection the
peer has closed is replaced; after it, we wait until the kernel's send queue is empty
(SIOCOUTQ: every byte ACKed by the peer) and fail the batch (so it is resent) if the
peer hangs up first. Duplicates are possible; loss needs the receiver to crash between
its kernel's ACK and its own read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from guard_agent.sinks._config import SyslogSinkConfig
from guard_agent.sinks._transport import DeliveryError, client_tls_context

__all__ = ["SyslogTransport", "format_rfc5424", "frame"]

_SEVERITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2}
_TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")
_SIOCOUTQ = 0x5411  # Linux TIOCOUTQ/SIOCOUTQ: bytes not yet acknowledged by the peer
_SETTLE_SECONDS = 0.2
_HANGUP = select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)


def _printable(value: str, limit: int) -> str:
    """RFC 5424 header fields: 1..limit printable US-ASCII characters, '-' when empty."""
    out = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return out or "-"


def format_rfc5424(line: bytes, *, facility: int, hostname: str, app_name: str, procid: str) -> bytes:
    """One event line as an RFC 5424 message: the event's own time, severity from its level, MSGID = action."""
    timestamp: bytes | None = None
    severity = 6
    msgid = "-"
    try:
        event: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        event = None
    if isinstance(event, dict):
        ts = event.get("@timestamp")
        if isinstance(ts, str) and _TIMESTAMP.match(ts.encode()):
            timestamp = ts.encode()
        log = event.get("log")
        if isinstance(log, dict):
            severity = _SEVERITY.get(str(log.get("level")), 6)
        ecs = event.get("event")
        if isinstance(ecs, dict):
            if ecs.get("kind") == "alert":
                severity = min(severity, 4)
            if isinstance(ecs.get("action"), str):
                msgid = _printable(ecs["action"], 32)
    if timestamp is None:
        timestamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z").encode()
    header = f"<{facility * 8 + severity}>1 ".encode() + timestamp + \
        f" {hostname} {app_name} {procid} {msgid} - ".encode()
    return header + line


def frame(message: bytes) -> bytes:
    """Octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode() + b" " + message


class SyslogTransport:
    """One persistent TCP or TLS connection, reopened on failure."""

    def __init__(self, config: SyslogSinkConfig) -> None:
        self.config = config
        self._hostname = _printable(config.hostname or os.environ.get("POD_NAME") or socket.gethostname(), 255)
        self._procid = str(os.getpid())
        self._tls = client_tls_context(config.tls) if config.tls is not None else None
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        c = self.config
        try:
            raw = socket.create_connection((c.host, c.port), timeout=c.timeout)
        except OSError as exc:
            raise DeliveryError(f"connect {c.host}:{c.port}: {exc.strerror or exc}") from None
        if self._tls is None:
            return raw
        server_name = c.tls.server_name if c.tls is not None and c.tls.server_name else c.host
        try:
            sock = self._tls.wrap_socket(raw, server_hostname=server_name)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise DeliveryError(f"TLS handshake with {c.host}:{c.port}: {exc}") from None
        self._settle(sock)
        return sock

    def _settle(self, sock: ssl.SSLSocket) -> None:
        """TLS 1.3 ends the client's handshake before the server has checked our certificate: give the
        server a moment to refuse it (an alert), so a rejected client does not mistake its first batch
        for delivered."""
        deadline = time.monotonic() + _SETTLE_SECONDS
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN | _HANGUP)
        try:
            sock.setblocking(False)
            while (left := deadline - time.monotonic()) > 0:
                if not p.poll(int(left * 1000) + 1):
                    continue
                try:
                    if sock.recv(4096) == b"":
                        raise DeliveryError("receiver closed the TLS connection right after the handshake")
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    time.sleep(0.005)   # session tickets or a partial record: keep listening
        except (ssl.SSLError, OSError) as exc:
            with contextlib.suppress(OSError):
                sock.close()
            raise DeliveryError(f"TLS connection to {self.config.host}:{self.config.port} refused: {exc}") from None
        except DeliveryError:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.config.timeout)

    def _peer_gone(self, sock: socket.socket) -> bool:
        """True when the receiver closed or reset an idle connection (so we do not write into the void)."""
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN | _HANGUP)
        events = p.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLHUP):
            return True
        sock.setblocking(False)
        try:
            return sock.recv(4096) == b""       # EOF; receivers send nothing else over syslog
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False                        # TLS records (session tickets), no application data
        except OSError:
            return True
        finally:
            sock.settimeout(self.config.timeout)

    def _wait_acked(self, sock: socket.socket) -> None:
        """Block until the peer's kernel acknowledged every byte sent, or fail the batch."""
        deadline = time.monotonic() + self.config.timeout
        p = select.poll()
        p.register(sock.fileno(), _HANGUP)
        while True:
            try:
                unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                return  # not Linux: written is the best we know
            if unacked == 0:
                return
            if p.poll(2):
                raise DeliveryError("connection closed by the receiver before it acknowledged the batch")
            if time.monotonic() > deadline:
                raise DeliveryError(f"receiver did not acknowledge within {self.config.timeout}s")

    def send(self, lines: Sequence[bytes]) -> int:
        c = self.config
        if self._sock is not None and self._peer_gone(self._sock):
            self.close()
        if self._sock is None:
            self._sock = self._connect()
        payload = b"".join(frame(format_rfc5424(line, facility=c.facility, hostname=self._hostname,
                                                app_name=c.app_name, procid=self._procid)) for line in lines)
        try:
            self._sock.sendall(payload)
            self._wait_acked(self._sock)
        except DeliveryError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise DeliveryError(f"send to {c.host}:{c.port}: {exc.strerror or exc}") from None
        return 0

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
