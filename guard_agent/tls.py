"""TLS termination for the guard listener, with certificates reloaded on change.

The listening socket keeps one ``SSLContext`` for its lifetime; its SNI callback
(OpenSSL calls it on every handshake, with or without SNI) hands each new
connection the most recently loaded context. A renewed certificate (cert-manager
rewriting a Secret) is therefore served to new connections without a restart,
established connections keep theirs, and a broken or half-written pair is
refused while the last good one stays.

With a client CA file the guard requires and verifies client certificates
(mTLS); the CA bundle reloads the same way.
"""

from __future__ import annotations

import ssl

from guard_agent.filewatch import file_identity

__all__ = ["TlsError", "TlsReloader", "build_context"]


class TlsError(ValueError):
    """The certificate, key or client CA cannot be loaded."""


def build_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """A hardened server context (TLS 1.2+); raises ``TlsError`` with the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load certificate {cert_file} with key {key_file}: {exc}") from exc
    if client_ca_file:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load client CA {client_ca_file}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TlsReloader:
    """Owns the listener's context and swaps in new certificates when their files change."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._seen = self._identities()
        self.current = build_context(cert_file, key_file, client_ca_file)
        self.context = build_context(cert_file, key_file, client_ca_file)  # handed to the listener once
        self.context.sni_callback = self._pick
        self.reloads = 0

    def _identities(self) -> tuple[object, ...]:
        return (file_identity(self.cert_file), file_identity(self.key_file), file_identity(self.client_ca_file))

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self.current is not ctx:
            sslobj.context = self.current

    def maybe_reload(self) -> bool:
        """Load the files again when any changed; True when a new context is active. Raises ``TlsError``."""
        seen = self._identities()
        if seen == self._seen:
            return False
        self._seen = seen  # a broken pair is reported once, not on every tick
        self.current = build_context(self.cert_file, self.key_file, self.client_ca_file)
        self.reloads += 1
        return True
