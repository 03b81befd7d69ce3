"""What a sink transport does: send a batch of event lines, or say why not."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Protocol

from guard_agent.sinks._config import TlsConfig

__all__ = ["DeliveryError", "Transport", "client_tls_context"]


class DeliveryError(Exception):
    """The batch was not acknowledged; it will be retried (``retry_after``: the receiver's hint, seconds)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Transport(Protocol):
    """Blocking; called from the sink's sender thread only."""

    def send(self, lines: Sequence[bytes]) -> int:
        """Deliver all lines in order; returns how many the receiver refused for good (counted as rejected).

        Raises DeliveryError when the batch must be sent again.
        """

    def close(self) -> None:
        """Drop the connection."""


def client_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """Verified client TLS (hostname and chain), TLS 1.2+, optional client certificate for mTLS."""
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
