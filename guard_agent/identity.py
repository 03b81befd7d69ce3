"""Session identity: which client is this, as a keyed hash (never the raw key).

Sources are tried in the configured order: the API-key header, a bearer token,
then the client address (the peer, or ``X-Forwarded-For`` when the peer is a
trusted proxy). The winning source is reduced to HMAC-SHA256 with a secret, so
replicas sharing the secret derive the same id and nothing sensitive is kept.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Identity", "IdentityResolver", "client_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Identity:
    session: str           # hex HMAC, safe to log and to put in policy lists
    source: str            # "header" | "bearer" | "address" | "anonymous"
    ip: IPAddress | None   # the client's address as the guard believes it
    authenticated: bool = False     # a credential was presented (and verified, when a key store / JWKS is set)
    principal: str | None = None    # a key's configured name or a token's claim, when verified
    rate_limit: Any = None          # a per-key RateLimit override, when the key store sets one


def _parse_ip(value: str | None) -> IPAddress | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value.strip().split("%", 1)[0])
    except ValueError:
        return None


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> IPAddress | None:
    """The client's address: walk ``X-Forwarded-For`` right to left while hops are trusted proxies."""
    ip = _parse_ip(peer)
    if ip is None or not forwarded_for or not _trusted(ip, trusted):
        return ip
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        hop_ip = _parse_ip(hop)
        if hop_ip is None:
            return ip
        ip = hop_ip
        if not _trusted(ip, trusted):
            return ip
    return ip


def _trusted(ip: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


class IdentityResolver:
    """Built once from settings; ``resolve()`` runs on every request."""

    def __init__(self, *, key: bytes, header: str, sources: Sequence[str], trusted_proxies: Sequence[str]) -> None:
        self._key = key
        self._header = header
        self._sources = tuple(sources)
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)

    def hash(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()[:32]

    def resolve(self, headers: Mapping[str, str], peer: str | None) -> Identity:
        ip = client_address(peer, headers.get("X-Forwarded-For"), self._trusted)
        for source in self._sources:
            if source == "header":
                value = headers.get(self._header, "").strip()
                if value:
                    return Identity(self.hash("key", value), "header", ip, authenticated=True)
            elif source == "bearer":
                auth = headers.get("Authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return Identity(self.hash("bearer", token.strip()), "bearer", ip, authenticated=True)
            elif source == "address" and ip is not None:
                return Identity(self.hash("ip", ip.compressed), "address", ip)
        return Identity(self.hash("anonymous", ""), "anonymous", ip)
