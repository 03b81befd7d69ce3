"""Session identity: which client is this, as a keyed hash (never the raw key).

Sources are tried in the configured order: the API-key header, a bearer token,
then the client address (the peer, or ``X-Forwarded-For`` when the peer is a
trusted proxy). The winning source is reduced to HMAC-SHA256 with a secret, so
replicas sharing the secret derive the same id and nothing sensitive is kept.

Without a key store or JWKS, any presented credential counts (the guard cannot
tell good from bad), but every such credential from one client address also
counts against that address's own session (``Identity.address_session``), so
inventing keys buys neither a fresh rate-limit bucket nor fresh trackers.
With either configured, only verified credentials
authenticate and name the session; an unknown key or a bad token falls through
to the next source (the address), so a client cannot mint fresh sessions by
inventing keys.

Everything ``resolve()`` derives from a credential or an address is a pure function
of it (the HMAC, the parsed address), so it is computed once and kept in bounded
caches keyed by a digest of the input (never the raw key or token); whether a
credential is still valid is asked of the key store / JWT verifier every time
(one dict lookup; a cached JWT ends at its ``exp`` and at a JWKS reload).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard_agent.auth import ApiKey, AuthError, BoundedCache, JwtVerifier, KeyStore

__all__ = ["Identity", "IdentityResolver", "client_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HASH_CACHE_ENTRIES = 16384   # session hashes: one per live key, token subject or client address
_ADDRESS_CACHE_ENTRIES = 4096  # (peer, X-Forwarded-For) -> client address
_MAX_CACHED_FORWARDED = 512    # longer X-Forwarded-For values are walked every time, not kept
_IDENTITY_CACHE_ENTRIES = 16384  # (credential digest, source, address) -> Identity


@dataclass(frozen=True)
class Identity:
    session: str           # hex HMAC, safe to log and to put in policy lists
    source: str            # "header" | "bearer" | "address" | "anonymous"
    ip: IPAddress | None   # the client's address as the guard believes it
    authenticated: bool = False     # a credential was presented (and verified, when a key store / JWKS is set)
    principal: str | None = None    # a key's configured name or a token's claim, when verified
    rate_limit: Any = None          # a per-key RateLimit override, when the key store sets one
    models: frozenset[str] | None = None  # the models a key may call (None = all)
    credential_error: str | None = None   # why a presented credential was not accepted (safe to log)
    address: str | None = None            # ``ip`` as text (``source.ip``), formatted once per address
    # an unverified credential (no key store, no JWKS) costs nothing to rotate: the client's address keeps a
    # second session (bucket, trackers, block) that every such credential from it shares; None otherwise
    address_session: str | None = None


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


_NOT_ASCII = "credential is not printable ASCII"


def _printable_ascii(value: str) -> bool:
    """Keys and tokens are printable ASCII; anything else (``caf\\xe9`` arrives as a surrogate escape) is refused
    as a credential rather than hashed, so no byte of it can reach an encoder error or a traceback."""
    return value.isascii() and value.isprintable()


def _trusted(ip: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


class IdentityResolver:
    """Built once from settings; ``resolve()`` runs on every request."""

    def __init__(self, *, key: bytes, header: str, sources: Sequence[str], trusted_proxies: Sequence[str],
                 keys: KeyStore | None = None, jwt: JwtVerifier | None = None) -> None:
        self._key = key
        self._header = header
        self._sources = tuple(sources)
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self.keys = keys
        self.jwt = jwt
        self._hashes: BoundedCache[bytes, str] = BoundedCache(_HASH_CACHE_ENTRIES)  # sha256(input) -> session
        self._addresses: BoundedCache[tuple[str | None, str | None], tuple[IPAddress | None, str | None]] = \
            BoundedCache(_ADDRESS_CACHE_ENTRIES)
        # identities of keys, built once per (key, source, address); a verified key's entry is kept beside its
        # identity and must be the key store's current one (a reload makes new entries)
        self._unverified_ids: BoundedCache[tuple[bytes, str, str | None], Identity] = \
            BoundedCache(_IDENTITY_CACHE_ENTRIES)
        self._verified_ids: BoundedCache[tuple[bytes, str, str | None], tuple[ApiKey, Identity]] = \
            BoundedCache(_IDENTITY_CACHE_ENTRIES)
        self._anonymous = self.hash("anonymous", "")

    def use_credentials(self, *, keys: KeyStore | None = None, jwt: JwtVerifier | None = None) -> None:
        """Attach verifiers after construction (the server does this from settings)."""
        self.keys = keys if keys is not None else self.keys
        self.jwt = jwt if jwt is not None else self.jwt

    @property
    def verifying(self) -> bool:
        """True when presented credentials are checked rather than merely counted."""
        return self.keys is not None or self.jwt is not None

    def hash(self, kind: str, value: str) -> str:
        """The session id of a source: HMAC-SHA256, computed once per input (the cache holds its SHA-256)."""
        data = f"{kind}\x00{value}".encode(errors="surrogateescape")
        digest = hashlib.sha256(data).digest()
        session = self._hashes.get(digest)
        if session is None:
            session = hmac.new(self._key, data, hashlib.sha256).hexdigest()[:32]
            self._hashes.put(digest, session)
        return session

    def _client(self, peer: str | None, forwarded_for: str | None) -> tuple[IPAddress | None, str | None]:
        """``client_address`` and its text, once per peer (and per X-Forwarded-For value from a trusted proxy:
        an untrusted client's header is ignored, so it cannot fill the cache with values of its own)."""
        held = self._addresses.get((peer, None))
        if held is None:
            ip = _parse_ip(peer)
            held = (ip, ip.compressed if ip is not None else None)
            self._addresses.put((peer, None), held)
        if not forwarded_for or held[0] is None or not self._trusted or not _trusted(held[0], self._trusted):
            return held
        key = (peer, forwarded_for)
        found = self._addresses.get(key) if len(forwarded_for) <= _MAX_CACHED_FORWARDED else None
        if found is None:
            ip = client_address(peer, forwarded_for, self._trusted)
            found = (ip, ip.compressed if ip is not None else None)
            if len(forwarded_for) <= _MAX_CACHED_FORWARDED:  # entries stay small: the cache holds at most ~2 MB
                self._addresses.put(key, found)
        return found

    def resolve(self, headers: Mapping[str, str], peer: str | None) -> Identity:
        ip, address = self._client(peer, headers.get("X-Forwarded-For"))
        error: str | None = None
        for source in self._sources:
            if source == "header":
                value = headers.get(self._header, "").strip()
                if value and not _printable_ascii(value):
                    error = error or _NOT_ASCII
                elif value:
                    found, why = self._from_key(value, "header", ip, address)
                    if found is not None:
                        return found
                    error = error or why
            elif source == "bearer":
                scheme, _, token = headers.get("Authorization", "").partition(" ")
                token = token.strip()
                if scheme.lower() == "bearer" and token and not _printable_ascii(token):
                    error = error or _NOT_ASCII
                elif scheme.lower() == "bearer" and token:
                    found, why = self._from_bearer(token, ip, address)
                    if found is not None:
                        return found
                    error = error or why
            elif source == "address" and address is not None:
                return Identity(self.hash("ip", address), "address", ip, credential_error=error,
                                address=address)
        return Identity(self._anonymous, "anonymous", ip, credential_error=error, address=address)

    def _address_session(self, address: str | None) -> str | None:
        """The session of a client address: the same whether the client sends a credential or none."""
        return None if address is None else self.hash("ip", address)

    def _from_key(self, value: str, source: str, ip: IPAddress | None,
                  address: str | None) -> tuple[Identity | None, str | None]:
        if self.keys is None:
            if self.verifying:  # a JWKS is set but no key store: a bare key proves nothing
                return None, "api keys not configured"
            return self._unverified("key", value, source, ip, address), None
        entry = self.keys.lookup(value)  # asked every time: a key removed by a reload fails at once
        if entry is None:
            return None, "unknown api key"
        return self._verified_key(entry, source, ip, address), None

    def _unverified(self, kind: str, value: str, source: str, ip: IPAddress | None,
                    address: str | None) -> Identity:
        """The identity of a credential nothing verifies: a pure function of the credential and the address,
        so built once per pair (cached under the credential's SHA-256, never the raw value)."""
        data = f"{kind}\x00{value}".encode(errors="surrogateescape")
        key = (hashlib.sha256(data).digest(), source, address)
        identity = self._unverified_ids.get(key)
        if identity is None:
            identity = Identity(self.hash(kind, value), source, ip, authenticated=True, address=address,
                                address_session=self._address_session(address))
            self._unverified_ids.put(key, identity)
        return identity

    def _verified_key(self, entry: ApiKey, source: str, ip: IPAddress | None, address: str | None) -> Identity:
        """The identity of a key the store holds, built once per (key, source, address): reused only while the
        store still answers with the very entry it was built from, so a reload (new name, limit or models)
        builds it again."""
        key = (entry.digest, source, address)
        held = self._verified_ids.get(key)
        if held is not None and held[0] is entry:
            return held[1]
        identity = Identity(self.hash("principal", f"key:{entry.name}"), source, ip, authenticated=True,
                            principal=entry.name, rate_limit=entry.rate_limit, models=entry.models, address=address)
        self._verified_ids.put(key, (entry, identity))
        return identity

    def _from_bearer(self, token: str, ip: IPAddress | None,
                     address: str | None) -> tuple[Identity | None, str | None]:
        if not self.verifying:
            return self._unverified("bearer", token, "bearer", ip, address), None
        if self.jwt is not None and token.count(".") == 2:
            try:
                principal = self.jwt.verify(token)
            except AuthError as exc:
                return None, str(exc)
            return Identity(self.hash("principal", f"jwt:{principal.issuer or ''}\x00{principal.subject}"),
                            "bearer", ip, authenticated=True, principal=principal.subject, address=address), None
        if self.keys is not None:  # an API key sent as a bearer token
            return self._from_key(token, "bearer", ip, address)
        return None, "bearer token is not a JWT"
