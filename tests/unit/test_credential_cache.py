"""Credential caches: a verified JWT, a key lookup and a session hash are computed once, and never outlive
the credential (JWKS / key-file reload, the token's exp). Real files, real signed tokens."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from guard_agent.auth import AuthError, BoundedCache, JwtVerifier, KeyStore
from guard_agent.demo import DigitsModel
from guard_agent.identity import IdentityResolver
from tests.conftest import v2_body
from tests.integration.test_access import (
    KEY_A,
    KEY_B,
    POLICY_REQUIRE,
    Issuer,
    infer,
    write_jwks,
    write_keys,
)

HMAC_KEY = b"k" * 32


class DecodeCounter:
    """Counts real signature checks (PyJWT's decode still runs: this only counts the calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counted)


def resolver(**credentials: Any) -> IdentityResolver:
    r = IdentityResolver(key=HMAC_KEY, header="X-API-Key", sources=("header", "bearer", "address"),
                         trusted_proxies=("10.0.0.0/8",))
    r.use_credentials(**credentials)
    return r


class TestBoundedCache:
    def test_never_holds_more_than_its_bound(self) -> None:
        """Inserting many keys keeps at most max_entries, the newest ones."""
        cache: BoundedCache[int, int] = BoundedCache(8)
        for i in range(100):
            cache.put(i, i * 2)
        assert len(cache) == 8
        assert cache.get(99) == 198 and cache.get(91) is None and cache.get(92) == 184

    def test_replacing_a_key_evicts_nothing(self) -> None:
        """Updating an entry of a full cache keeps every other entry."""
        cache: BoundedCache[str, int] = BoundedCache(2)
        cache.put("a", 1)
        cache.put("b", 2)
        cache.put("a", 3)
        assert (cache.get("a"), cache.get("b")) == (3, 2)


class TestJwtCache:
    def test_a_token_is_verified_once(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The second presentation of a valid token costs no signature check and gives the same principal."""
        idp = Issuer("ES256", "e1")
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", idp), issuer="https://idp.test", audience="guard")
        counter = DecodeCounter(monkeypatch)
        token = idp.token()
        first, second = v.verify(token), v.verify(token)
        assert counter.calls == 1 and v.cached_tokens == 1
        assert first.subject == second.subject == "alice"
        v.verify(idp.token(sub="bob"))
        assert counter.calls == 2 and v.cached_tokens == 2

    def test_failures_are_not_cached(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A refused token is checked again every time (it may only become valid: nbf)."""
        idp = Issuer("ES256", "e1")
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", idp), leeway=0)
        counter = DecodeCounter(monkeypatch)
        early = idp.token(nbf=int(time.time()) + 3600)
        for _ in range(2):
            with pytest.raises(AuthError, match="ImmatureSignatureError"):
                v.verify(early)
        assert counter.calls == 2 and v.cached_tokens == 0

    def test_entry_ends_at_exp(self, tmp_path: Path) -> None:
        """With no leeway, a cached token is refused as soon as its exp passes."""
        idp = Issuer("ES256", "e1")
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", idp), leeway=0)
        exp = int(time.time()) + 2
        token = idp.token(exp=exp)
        assert v.verify(token).subject == "alice" and v.cached_tokens == 1
        while time.time() < exp + 0.05:
            time.sleep(0.05)
        with pytest.raises(AuthError, match="ExpiredSignatureError"):
            v.verify(token)
        assert v.cached_tokens == 0

    def test_past_exp_the_leeway_is_decided_by_a_fresh_verification(self, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        """With the default leeway a token just past exp is verified again (and still accepted, as before)."""
        idp = Issuer("ES256", "e1")
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", idp))
        token = idp.token(exp=int(time.time()) - 1)  # expired, but within the 30 s leeway
        counter = DecodeCounter(monkeypatch)
        assert v.verify(token).subject == "alice" and v.verify(token).subject == "alice"
        assert counter.calls == 2 and v.cached_tokens == 0

    def test_jwks_reload_forgets_every_token(self, tmp_path: Path) -> None:
        """A key removed from the JWKS: its tokens, though cached, are refused right after the reload."""
        old, new = Issuer("ES256", "old"), Issuer("ES256", "new")
        path = write_jwks(tmp_path / "jwks.json", old)
        v = JwtVerifier(path)
        token = old.token()
        assert v.verify(token).subject == "alice" and v.cached_tokens == 1
        write_jwks(path, new)
        assert v.maybe_reload()
        assert v.cached_tokens == 0
        with pytest.raises(AuthError, match="no key in the JWKS"):
            v.verify(token)
        assert v.verify(new.token()).subject == "alice"

    def test_cache_is_bounded(self, tmp_path: Path) -> None:
        """More distinct tokens than entries: the cache keeps its bound."""
        idp = Issuer("ES256", "e1")
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", idp), cache_entries=3)
        for i in range(10):
            v.verify(idp.token(sub=f"user-{i}"))
        assert v.cached_tokens == 3


class TestKeyLookup:
    def test_lookup_by_digest_finds_each_of_many_keys(self, tmp_path: Path) -> None:
        """With 500 keys every one is found, with its own entry; near misses are not."""
        keys = [f"key-{i:04d}-" + "x" * 16 for i in range(500)]
        store = KeyStore(write_keys(tmp_path / "k.yaml", [{"name": f"n{i}", "key": k} for i, k in enumerate(keys)]))
        for i in (0, 123, 499):
            found = store.lookup(keys[i])
            assert found is not None and found.name == f"n{i}"
        assert store.lookup(keys[7][:-1]) is None and store.lookup(keys[7] + "x") is None


class TestIdentityCaches:
    def test_session_ids_are_the_plain_hmac(self) -> None:
        """Cached or not, a session id is HMAC-SHA256(secret, kind NUL value)[:32], as replicas compute it."""
        r = resolver()
        for _ in range(2):
            assert r.resolve({"X-API-Key": "client-key-1"}, "10.0.0.1").session == \
                hmac.new(HMAC_KEY, b"key\x00client-key-1", hashlib.sha256).hexdigest()[:32]
            assert r.resolve({}, "203.0.113.9").session == \
                hmac.new(HMAC_KEY, b"ip\x00203.0.113.9", hashlib.sha256).hexdigest()[:32]
            assert r.resolve({}, None).session == hmac.new(HMAC_KEY, b"anonymous\x00", hashlib.sha256).hexdigest()[:32]

    def test_caches_hold_no_raw_credential(self, tmp_path: Path) -> None:
        """After resolving a key and a token, neither appears in the resolver's caches."""
        idp = Issuer("ES256", "e1")
        token = idp.token()
        r = resolver(jwt=JwtVerifier(write_jwks(tmp_path / "jwks.json", idp)),
                     keys=KeyStore(write_keys(tmp_path / "k.yaml", [{"name": "a", "key": KEY_A}])))
        assert r.resolve({"X-API-Key": KEY_A}, "127.0.0.1").principal == "a"
        assert r.resolve({"Authorization": f"Bearer {token}"}, "127.0.0.1").principal == "alice"
        held = repr(vars(r)) + repr(r._hashes._data) + repr(r._addresses._data) + repr(vars(r.jwt))
        assert len(r._hashes) >= 2
        assert KEY_A not in held and token not in held and token.split(".")[2] not in held

    def test_forwarded_for_is_cached_per_peer_and_header(self) -> None:
        """The (peer, X-Forwarded-For) cache never gives one pair's address to another."""
        r = resolver()
        a = r.resolve({"X-Forwarded-For": "198.51.100.1"}, "10.0.0.1")
        b = r.resolve({"X-Forwarded-For": "198.51.100.1"}, "203.0.113.5")  # untrusted peer: header ignored
        c = r.resolve({"X-Forwarded-For": "198.51.100.2"}, "10.0.0.1")
        again = r.resolve({"X-Forwarded-For": "198.51.100.1"}, "10.0.0.1")
        assert (a.address, b.address, c.address, again.address) == \
            ("198.51.100.1", "203.0.113.5", "198.51.100.2", "198.51.100.1")
        assert a.session == again.session != c.session
        assert str(a.ip) == a.address

    def test_untrusted_clients_cannot_fill_the_address_cache(self) -> None:
        """X-Forwarded-For values from an untrusted peer are ignored, so they add no entries; a long chain
        from a trusted proxy is walked (right to left) but not kept."""
        r = resolver()
        for i in range(200):
            assert r.resolve({"X-Forwarded-For": f"198.51.100.{i % 250}, 192.0.2.{i}"}, "203.0.113.5").address \
                == "203.0.113.5"
        assert len(r._addresses) == 1
        chain = ", ".join(["10.9.9.9"] * 120 + ["198.51.100.77", "10.1.1.1"])
        assert len(chain) > 512
        assert r.resolve({"X-Forwarded-For": chain}, "10.0.0.1").address == "198.51.100.77"
        assert len(r._addresses) == 2  # the trusted peer itself, not the long chain

    def test_removed_key_stops_at_once_after_reload(self, tmp_path: Path) -> None:
        """A key resolved (and cached) before a reload that removes it falls through to the address at once."""
        path = write_keys(tmp_path / "k.yaml", [{"name": "a", "key": KEY_A}, {"name": "b", "key": KEY_B}])
        r = resolver(keys=KeyStore(path))
        for _ in range(3):
            assert r.resolve({"X-API-Key": KEY_A}, "127.0.0.1").principal == "a"
        write_keys(path, [{"name": "b", "key": KEY_B}])
        assert r.keys is not None and r.keys.maybe_reload()
        gone = r.resolve({"X-API-Key": KEY_A}, "127.0.0.1")
        assert (gone.source, gone.authenticated, gone.credential_error) == ("address", False, "unknown api key")
        assert r.resolve({"X-API-Key": KEY_B}, "127.0.0.1").principal == "b"

    def test_key_identity_is_built_once_and_follows_a_reload(self, tmp_path: Path) -> None:
        """One key from one address resolves to the same identity object each time; a reload that renames the
        key or changes its models gives the new name and models at once, and another address its own."""
        path = write_keys(tmp_path / "k.yaml", [{"name": "a", "key": KEY_A}])
        r = resolver(keys=KeyStore(path))
        first = r.resolve({"X-API-Key": KEY_A}, "127.0.0.1")
        assert r.resolve({"X-API-Key": KEY_A}, "127.0.0.1") is first
        other = r.resolve({"X-API-Key": KEY_A}, "127.0.0.2")
        assert (other.address, other.session) == ("127.0.0.2", first.session)
        write_keys(path, [{"name": "renamed", "key": KEY_A, "models": ["m1"]}])
        assert r.keys is not None and r.keys.maybe_reload()
        after = r.resolve({"X-API-Key": KEY_A}, "127.0.0.1")
        assert (after.principal, after.models) == ("renamed", frozenset({"m1"}))
        assert after.session != first.session
        held = repr(r._verified_ids._data) + repr(r._unverified_ids._data)
        assert KEY_A not in held

    def test_unverified_key_identity_is_built_once_per_address(self) -> None:
        """Without a key store a key's identity (its session and its address's session) is reused for the same
        address, and each address gets its own address session."""
        r = resolver()
        a = r.resolve({"X-API-Key": "client-key-1"}, "198.51.100.1")
        assert r.resolve({"X-API-Key": "client-key-1"}, "198.51.100.1") is a
        b = r.resolve({"X-API-Key": "client-key-1"}, "198.51.100.2")
        assert a.session == b.session and a.address_session != b.address_session
        assert "client-key-1" not in repr(r._unverified_ids._data)


class TestOnTheGuard:
    async def test_jwks_rotation_refuses_a_cached_token(self, tmp_path: Path, demo_model_url: str,
                                                        start_guard: Any, demo_model: DigitsModel,
                                                        ) -> None:
        """A token accepted (and cached) by the running guard gets 401 once the JWKS no longer holds its key."""
        (tmp_path / "policy.yaml").write_text(POLICY_REQUIRE)
        old, new = Issuer("ES256", "old"), Issuer("ES256", "new")
        jwks = write_jwks(tmp_path / "jwks.json", old)
        guard = await start_guard(demo_model_url, policy=str(tmp_path / "policy.yaml"), jwt_jwks_file=str(jwks),
                                  jwt_issuer="https://idp.test", jwt_audience="guard")
        body = v2_body(demo_model.X_test[0])
        token = {"Authorization": f"Bearer {old.token()}"}
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                assert (await infer(http, guard.url, body, token))[0] == 200
            write_jwks(jwks, new)
            for _ in range(100):
                if any(e["message"] == "jwks reloaded" for e in guard.events):
                    break
                await asyncio.sleep(0.05)
            assert any(e["message"] == "jwks reloaded" for e in guard.events)
            status, doc = await infer(http, guard.url, body, {**token, "X-Request-Id": "after"})
            assert status == 401 and doc["error"]["code"] == "unauthorized"
            assert (await infer(http, guard.url, body, {"Authorization": f"Bearer {new.token()}"}))[0] == 200
        assert "no key in the JWKS" in guard.events_for("after")[0]["guard"]["credential_error"]
