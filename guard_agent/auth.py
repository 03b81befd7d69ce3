"""Credentials the guard can verify: an API-key store and a JWT verifier.

API keys come from a YAML/JSON file (a mounted Secret). Each entry gives the key
itself (hashed at load, the raw value dropped) or, better, only its SHA-256, so
the Secret holds nothing a client could send. A presented key is hashed and
looked up by its digest in a dict: a timing difference could at most tell a
client how the digest of a key it chose compares with stored digests, and even a
whole stored digest does not give its key (that needs a SHA-256 preimage). Keys must be
high-entropy random strings (>= 16 characters): SHA-256 is a lookup hash here,
not a password hash.

JWTs are verified with PyJWT against keys from a JWKS file. Only asymmetric
algorithms are accepted (no ``none``, no HMAC with a public key), the header's
``alg`` must agree with the key, ``exp`` is required, ``nbf`` honoured, and
``iss`` / ``aud`` checked when configured. The session comes from a configured
claim, so every token of one subject shares one session. A verified token is
remembered (by its SHA-256, bounded) until its ``exp``, so a client re-sending
its token is not re-verified on every request: the checks that depend on the
clock (``nbf``, ``iat``) only ever turn from failing to passing, ``exp`` ends
the entry, and a JWKS reload forgets every entry.

Both stores reload when their file changes and keep the last good contents when
the new file is broken. Errors name the file, the entry and the line, never a piece
of the file: they are logged, and the file holds secrets.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
import orjson
import yaml

from guard_agent.filewatch import file_identity
from guard_agent.policy.model import RateLimit
from guard_agent.settings import decode_error_summary, yaml_error_summary

__all__ = ["ASYMMETRIC_ALGORITHMS", "ApiKey", "AuthError", "BoundedCache", "CredentialFile", "JwtPrincipal",
           "JwtVerifier", "KeyStore", "key_digest"]

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})
_MIN_KEY_CHARS = 16
_MAX_KEY_CHARS = 4096
_MAX_TOKEN_CHARS = 16384
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,14}")  # shorter than any accepted key
_JWT_CACHE_ENTRIES = 4096

K = TypeVar("K")
V = TypeVar("V")


class AuthError(ValueError):
    """A credential file is malformed, or a presented credential failed verification."""


def key_digest(key: str) -> str:
    """The hex SHA-256 a key file may store instead of the key (``printf %s KEY | sha256sum``)."""
    return hashlib.sha256(key.encode()).hexdigest()


class BoundedCache(Generic[K, V]):
    """A dict that forgets its oldest entry when full: per-request results computed once per credential.

    First in, first out (a hit is one dict lookup, no reordering): a client spraying new credentials can
    only evict entries, which then cost what they cost without a cache."""

    __slots__ = ("_data", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, int(max_entries))
        self._data: dict[K, V] = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        data = self._data
        if key not in data and len(data) >= self.max_entries:
            del data[next(iter(data))]
        data[key] = value

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class CredentialFile:
    """A file whose parsed contents are swapped in only when the new version parses."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._identity: tuple[int, int, int, int] | None = None
        self.load()

    def load(self) -> None:
        """Read and activate the file now; raises ``AuthError`` and keeps the old contents on failure."""
        identity = file_identity(self.path)
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise AuthError(f"cannot read {self.path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise AuthError(f"{self.path}: {decode_error_summary(exc)}") from None
        self._activate(self._parse(text))
        self._identity = identity

    def changed_on_disk(self) -> bool:
        return file_identity(self.path) != self._identity

    def maybe_reload(self) -> bool:
        """Reload when the file changed; True when new contents became active. Raises ``AuthError``."""
        if not self.changed_on_disk():
            return False
        identity = file_identity(self.path)
        try:
            self.load()
        except AuthError:
            self._identity = identity  # do not retry (and log) the same broken file every tick
            raise
        return True

    def _parse(self, text: str) -> Any:
        raise NotImplementedError

    def _activate(self, parsed: Any) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: never the key itself, only its digest and what it grants."""

    name: str
    digest: bytes
    rate_limit: RateLimit | None = None
    models: frozenset[str] | None = None   # None = every model


def _parse_rate_limit(raw: Any, where: str) -> RateLimit | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"rate", "burst"} or "rate" not in raw:
        raise AuthError(f"{where}.rate_limit: expected {{rate: N, burst: M}}")
    try:
        rate = float(raw["rate"])
        burst = float(raw.get("burst", max(1.0, rate)))
    except (TypeError, ValueError):
        raise AuthError(f"{where}.rate_limit: rate and burst must be numbers") from None
    if not (0 < rate < float("inf") and 1 <= burst < float("inf")):
        raise AuthError(f"{where}.rate_limit: rate must be > 0 and burst >= 1")
    return RateLimit(rate=rate, burst=burst)


def _parse_entry(raw: Any, index: int) -> ApiKey:
    where = f"keys[{index}]"
    allowed = {"name", "key", "sha256", "rate_limit", "models"}
    if not isinstance(raw, Mapping):
        raise AuthError(f"{where}: expected a mapping")
    unknown = set(raw) - allowed
    if unknown:
        # a key pasted where a field name belongs ({name: a, <key>}) must not be echoed: show only short names
        shown = sorted(str(f) for f in unknown if isinstance(f, str) and _FIELD_NAME.fullmatch(f))
        hidden = f" and {len(unknown) - len(shown)} not shown" if len(shown) < len(unknown) else ""
        raise AuthError(f"{where}: unknown field(s) {shown}{hidden}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AuthError(f"{where}.name: required, a non-empty string")
    if ("key" in raw) == ("sha256" in raw):
        raise AuthError(f"{where}: give exactly one of key or sha256")
    if "key" in raw:
        key = raw["key"]
        if not isinstance(key, str) or not _MIN_KEY_CHARS <= len(key) <= _MAX_KEY_CHARS:
            raise AuthError(f"{where}.key: must be a string of {_MIN_KEY_CHARS}..{_MAX_KEY_CHARS} characters")
        digest = hashlib.sha256(key.encode()).digest()
    else:
        hexed = raw["sha256"]
        if not isinstance(hexed, str) or len(hexed) != 64:
            raise AuthError(f"{where}.sha256: expected 64 hex digits")
        try:
            digest = bytes.fromhex(hexed)
        except ValueError as exc:
            raise AuthError(f"{where}.sha256: expected 64 hex digits") from exc
    models = raw.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise AuthError(f"{where}.models: expected a list of model names")
        models = frozenset(models)
    return ApiKey(name=name.strip(), digest=digest, rate_limit=_parse_rate_limit(raw.get("rate_limit"), where),
                  models=models)


class KeyStore(CredentialFile):
    """Accepted API keys, from a file ``{keys: [{name, key | sha256, rate_limit?, models?}]}``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._keys: tuple[ApiKey, ...] = ()
        self._by_digest: dict[bytes, ApiKey] = {}
        super().__init__(path)

    def __len__(self) -> int:
        return len(self._keys)

    def _parse(self, text: str) -> tuple[ApiKey, ...]:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # PyYAML's message quotes the bad line, a key: problem and place only
            raise AuthError(f"{self.path}: not YAML/JSON: {yaml_error_summary(exc)}") from None
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list) or set(doc) - {"keys"}:
            raise AuthError(f"{self.path}: expected a mapping with one field, keys: [...]")
        keys = tuple(_parse_entry(entry, i) for i, entry in enumerate(doc["keys"]))
        digests = [k.digest for k in keys]
        if len(set(digests)) != len(digests):
            raise AuthError(f"{self.path}: the same key is listed twice")
        return keys

    def _activate(self, parsed: tuple[ApiKey, ...]) -> None:
        # one assignment swaps the whole table: a key removed from the file stops working with this reload
        self._keys, self._by_digest = parsed, {k.digest: k for k in parsed}

    def lookup(self, presented: str) -> ApiKey | None:
        """The entry for a presented key, or None: one SHA-256 and one dict lookup, whatever the number of keys."""
        if not presented or len(presented) > _MAX_KEY_CHARS:
            return None
        return self._by_digest.get(hashlib.sha256(presented.encode(errors="surrogateescape")).digest())


@dataclass(frozen=True)
class JwtPrincipal:
    """A verified token: who it names (the session claim) and who issued it."""

    subject: str
    issuer: str | None
    claims: Mapping[str, Any]


class JwtVerifier(CredentialFile):
    """Verifies bearer JWTs against a JWKS file (``{"keys": [...]}``)."""

    def __init__(self, path: str | os.PathLike[str], *, issuer: str | None = None, audience: str | None = None,
                 session_claim: str = "sub", leeway: float = 30.0,
                 algorithms: Sequence[str] = tuple(sorted(ASYMMETRIC_ALGORITHMS)),
                 cache_entries: int = _JWT_CACHE_ENTRIES) -> None:
        bad = set(algorithms) - ASYMMETRIC_ALGORITHMS
        if bad:
            raise AuthError(f"only asymmetric JWT algorithms are accepted, not {sorted(bad)}")
        self.issuer, self.audience, self.session_claim, self.leeway = issuer, audience, session_claim, leeway
        self._algorithms = frozenset(algorithms)
        self._keys: tuple[jwt.PyJWK, ...] = ()
        # sha256(token) -> (principal, exp): a signature check costs tens of microseconds, a lookup one
        self._verified: BoundedCache[bytes, tuple[JwtPrincipal, float]] = BoundedCache(cache_entries)
        super().__init__(path)

    def _parse(self, text: str) -> tuple[jwt.PyJWK, ...]:
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise AuthError(f"{self.path}: not JSON (line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise AuthError(f"{self.path}: expected a JWKS document {{\"keys\": [...]}}")
        keys: list[jwt.PyJWK] = []
        for i, entry in enumerate(doc["keys"]):
            if not isinstance(entry, dict):
                raise AuthError(f"{self.path}: keys[{i}] is not an object")
            if entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") == "oct" or "k" in entry:
                raise AuthError(f"{self.path}: keys[{i}] is a symmetric key; only public keys belong in a JWKS")
            if "d" in entry:
                raise AuthError(f"{self.path}: keys[{i}] holds a private key; publish only the public part")
            try:
                keys.append(jwt.PyJWK(entry))
            except jwt.PyJWTError as exc:  # PyJWT's messages may print the whole entry
                raise AuthError(f"{self.path}: keys[{i}] is not a usable public key ({type(exc).__name__}): "
                                "check its kty, crv and alg") from None
        if not keys:
            raise AuthError(f"{self.path}: no usable signing keys")
        return tuple(keys)

    def _activate(self, parsed: tuple[jwt.PyJWK, ...]) -> None:
        self._keys = parsed
        self._verified.clear()  # a key removed from the JWKS: its tokens stop working with this reload

    @property
    def cached_tokens(self) -> int:
        """Verified tokens remembered now (for tests and operators)."""
        return len(self._verified)

    def _key_for(self, header: Mapping[str, Any]) -> jwt.PyJWK:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("token algorithm not accepted")
        kid = header.get("kid")
        candidates = [k for k in self._keys if kid is None or k.key_id == kid]
        if kid is None and len(candidates) != 1:
            raise AuthError("token has no kid and the JWKS holds several keys")
        for key in candidates:
            if key.algorithm_name == alg:
                return key
        raise AuthError("no key in the JWKS matches the token's kid and alg")

    def verify(self, token: str) -> JwtPrincipal:
        """The verified principal; raises ``AuthError`` (never a PyJWT error) on any failure.

        A token verified before is answered from the cache until its ``exp`` (not ``exp`` + leeway: past
        ``exp`` it is verified again, and the leeway applies as it always did). Failures are not cached."""
        if len(token) > _MAX_TOKEN_CHARS:
            raise AuthError("token too long")
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        held = self._verified.get(digest)
        if held is not None:
            if time.time() < held[1]:
                return held[0]
            self._verified.pop(digest)
        principal = self._verify(token)
        exp = principal.claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            expires = float(int(exp))  # PyJWT compares int(exp): a fraction must not extend the entry
            if time.time() < expires:
                self._verified.put(digest, (principal, expires))
        return principal

    def _verify(self, token: str) -> JwtPrincipal:
        try:
            header = jwt.get_unverified_header(token)
            key = self._key_for(header)
            require = ["exp"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
            claims = jwt.decode(token, key=key, algorithms=[key.algorithm_name], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway,
                                options={"require": require, "verify_aud": self.audience is not None})
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from exc
        subject = claims.get(self.session_claim)
        if isinstance(subject, bool) or not isinstance(subject, (str, int)) or subject == "":
            raise AuthError(f"token lacks the session claim {self.session_claim!r}")
        issuer = claims.get("iss")
        return JwtPrincipal(subject=str(subject), issuer=issuer if isinstance(issuer, str) else None, claims=claims)
