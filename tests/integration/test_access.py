"""Access control: API keys (hashed, per-key limits and models) and JWTs against a JWKS, on a real guard."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from guard_agent.auth import AuthError, JwtVerifier, KeyStore, key_digest
from guard_agent.demo import DigitsModel
from tests.conftest import v2_body

KEY_A = "ka-" + "a1b2c3d4e5f6a7b8c9d0"
KEY_B = "kb-" + "0f9e8d7c6b5a4f3e2d1c"
KEY_C = "kc-" + "5e6f7a8b9c0d1e2f3a4b"
POLICY_REQUIRE = "version: 1\nmode: enforce\naccess:\n  require_credentials: true\n"


def write_keys(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"keys": entries}))
    return path


class Issuer:
    """A signing key with its public JWKS, as an identity provider would publish it."""

    def __init__(self, kind: str = "RS256", kid: str = "k1") -> None:
        self.alg, self.kid = kind, kid
        self.private: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "RS256"
                             else ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        doc: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        doc.update(kid=self.kid, alg=self.alg, use="sig")
        return doc

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "https://idp.test", "aud": "guard", "sub": "alice", "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


def write_jwks(path: Path, *issuers: Issuer) -> Path:
    path.write_text(json.dumps({"keys": [i.jwk() for i in issuers]}))
    return path


async def infer(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                model: str = "digits") -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v2/models/{model}/infer", data=body,
                         headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.json(content_type=None)


class TestKeyStore:
    def test_raw_keys_are_kept_only_as_digests(self, tmp_path: Path) -> None:
        """A raw key in the file is hashed at load; the store holds no copy of it."""
        store = KeyStore(write_keys(tmp_path / "keys.yaml", [{"name": "a", "key": KEY_A}]))
        found = store.lookup(KEY_A)
        assert found is not None and found.digest == bytes.fromhex(key_digest(KEY_A))
        assert all(KEY_A not in repr(v) for v in vars(store).values())

    def test_digest_entries_accept_the_key(self, tmp_path: Path) -> None:
        """An entry giving only the SHA-256 accepts the key and nothing else."""
        store = KeyStore(write_keys(tmp_path / "k.yaml", [{"name": "b", "sha256": key_digest(KEY_B)}]))
        found = store.lookup(KEY_B)
        assert found is not None and found.name == "b"
        assert store.lookup(KEY_B[:-1]) is None
        assert store.lookup(KEY_B + "x") is None
        assert store.lookup("") is None

    @pytest.mark.parametrize(("entries", "fragment"), [
        ([{"name": "a", "key": "short"}], "keys[0].key"),
        ([{"name": "a"}], "exactly one of key or sha256"),
        ([{"key": KEY_A}], "keys[0].name"),
        ([{"name": "a", "sha256": "zz" * 32}], "keys[0].sha256"),
        ([{"name": "a", "key": KEY_A, "rate_limit": {"rate": -1}}], "rate_limit"),
        ([{"name": "a", "key": KEY_A, "colour": "red"}], "unknown field"),
        ([{"name": "a", "key": KEY_A}, {"name": "b", "key": KEY_A}], "listed twice"),
    ])
    def test_bad_entries_are_refused_with_the_field(self, tmp_path: Path, entries: list[dict[str, Any]],
                                                    fragment: str) -> None:
        """A malformed key file is refused with a message naming the bad field."""
        with pytest.raises(AuthError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            KeyStore(write_keys(tmp_path / "k.yaml", entries))

    @pytest.mark.parametrize(("text", "where"), [
        (f"keys:\n  - name: a\n    key: {KEY_C}: oops\n", "line 3, column"),      # mapping value on the line
        (f"keys:\n  - {{name: a, key: '{KEY_C}}}\n", "line"),                       # unterminated quote
        (f'{{"keys": [{{"name": "a", "key": "{KEY_C}"}}', "line 1"),                  # JSON cut short
        (f"keys: [{{name: a, {KEY_C}}}]\n", "unknown field"),                         # the key as a field name
        (f"keys:\n  - name: a\n    key: !!python/name:{KEY_C}\n", "line 3"),      # a tag safe_load refuses
    ])
    def test_errors_never_quote_the_file(self, tmp_path: Path, text: str, where: str) -> None:
        """A broken key file is refused with the problem and its line/column, never with a piece of the file
        (the bad line holds a key)."""
        path = tmp_path / "k.yaml"
        path.write_text(text)
        with pytest.raises(AuthError) as info:
            KeyStore(path)
        message = str(info.value)
        assert where in message and KEY_C not in message and KEY_C[3:] not in message

    def test_undecodable_file_is_not_quoted(self, tmp_path: Path) -> None:
        """A key file that is not UTF-8 is refused without the bytes around the bad one."""
        path = tmp_path / "k.yaml"
        path.write_bytes(f"keys: [{{name: a, key: {KEY_C}".encode() + b"\xff\xfe}]\n")
        with pytest.raises(AuthError, match="UTF-8") as info:
            KeyStore(path)
        assert KEY_C not in str(info.value) and "0xff" not in str(info.value)

    def test_reload_swaps_and_keeps_last_good(self, tmp_path: Path) -> None:
        """A changed file is reloaded; a broken one raises and the previous keys stay active."""
        path = write_keys(tmp_path / "k.yaml", [{"name": "a", "key": KEY_A}])
        store = KeyStore(path)
        write_keys(path, [{"name": "b", "key": KEY_B}])
        assert store.maybe_reload()
        assert store.lookup(KEY_A) is None and store.lookup(KEY_B) is not None
        path.write_text("keys: [{name: c, key: ")
        with pytest.raises(AuthError):
            store.maybe_reload()
        assert store.lookup(KEY_B) is not None
        assert not store.maybe_reload()  # the same broken file is not retried every tick


class TestJwtVerifier:
    def test_valid_tokens_of_both_key_types(self, tmp_path: Path) -> None:
        """RS256 and ES256 tokens signed by keys in the JWKS verify; the session claim is returned."""
        rs, es = Issuer("RS256", "r1"), Issuer("ES256", "e1")
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", rs, es), issuer="https://idp.test", audience="guard")
        assert v.verify(rs.token()).subject == "alice"
        assert v.verify(es.token(sub="bob")).subject == "bob"

    @pytest.mark.parametrize(("claims", "why"), [
        ({"exp": int(time.time()) - 3600}, "ExpiredSignatureError"),
        ({"nbf": int(time.time()) + 3600}, "ImmatureSignatureError"),
        ({"aud": "someone-else"}, "InvalidAudienceError"),
        ({"iss": "https://evil.test"}, "InvalidIssuerError"),
        ({"exp": None}, "MissingRequiredClaimError"),
    ])
    def test_claims_are_enforced(self, tmp_path: Path, claims: dict[str, Any], why: str) -> None:
        """exp, nbf, aud and iss are checked, and exp is required."""
        rs = Issuer()
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", rs), issuer="https://idp.test", audience="guard")
        with pytest.raises(AuthError, match=why):
            v.verify(rs.token(**claims))

    def test_forged_tokens_are_refused(self, tmp_path: Path) -> None:
        """A foreign key, alg=none, and HS256 signed with the public key (alg confusion) all fail."""
        rs = Issuer()
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", rs))
        with pytest.raises(AuthError):
            v.verify(Issuer().token())  # same kid, different key
        unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none",
                              headers={"kid": "k1"})
        with pytest.raises(AuthError, match="algorithm"):
            v.verify(unsigned)
        import base64
        import hashlib
        import hmac as hmac_mod

        from cryptography.hazmat.primitives import serialization

        pem = rs.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
        body = b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 60}).encode())
        sig = b64(hmac_mod.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
        with pytest.raises(AuthError, match="algorithm"):
            v.verify(f"{head}.{body}.{sig}")
        with pytest.raises(AuthError):
            v.verify("not.a.jwt")

    def test_jwks_refuses_symmetric_and_private_keys(self, tmp_path: Path) -> None:
        """A JWKS holding a shared secret or a private key is a configuration error."""
        (tmp_path / "oct.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}))
        with pytest.raises(AuthError, match="symmetric"):
            JwtVerifier(tmp_path / "oct.json")
        rs = Issuer()
        private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rs.private))
        (tmp_path / "priv.json").write_text(json.dumps({"keys": [private]}))
        with pytest.raises(AuthError, match="private"):
            JwtVerifier(tmp_path / "priv.json")

    def test_jwks_errors_never_quote_the_file(self, tmp_path: Path) -> None:
        """A broken JWKS, or an entry PyJWT rejects (whose message would print the whole entry), is refused
        without quoting the file: a secret pasted there by mistake stays out of the logs."""
        secret = "c2VjcmV0LXNoYXJlZC1rZXktMTIzNDU2"
        cases = {
            "cut.json": '{"keys": [{"kty": "RSA", "n": "' + secret + '"',
            "nokty.json": json.dumps({"keys": [{"k": secret, "kid": "s"}]}),
            "badkty.json": json.dumps({"keys": [{"kty": "RSA", "n": secret, "e": "AQAB", "alg": "HS256"}]}),
            "nocrv.json": json.dumps({"keys": [{"kty": "EC", "x": secret, "y": secret}]}),
        }
        for name, text in cases.items():
            (tmp_path / name).write_text(text)
            with pytest.raises(AuthError) as info:
                JwtVerifier(tmp_path / name)
            assert secret not in str(info.value), name

    def test_missing_session_claim_is_refused(self, tmp_path: Path) -> None:
        """A token without the configured session claim does not authenticate."""
        rs = Issuer()
        v = JwtVerifier(write_jwks(tmp_path / "jwks.json", rs), session_claim="client_id")
        with pytest.raises(AuthError, match="client_id"):
            v.verify(rs.token())
        assert v.verify(rs.token(client_id="svc-7")).subject == "svc-7"


class TestApiKeysOnTheGuard:
    async def test_missing_unknown_and_valid_keys(self, tmp_path: Path, demo_model_url: str, start_guard,
                                                  demo_model: DigitsModel) -> None:
        """No key and an unknown key get 401 with a JSON error; a listed key (header or bearer) gets 200."""
        (tmp_path / "policy.yaml").write_text(POLICY_REQUIRE)
        keys = write_keys(tmp_path / "keys.yaml", [{"name": "team-a", "sha256": key_digest(KEY_A)}])
        guard = await start_guard(demo_model_url, policy=str(tmp_path / "policy.yaml"), api_keys_file=str(keys))
        body = v2_body(demo_model.X_test[0])
        async with aiohttp.ClientSession() as http:
            status, doc = await infer(http, guard.url, body, {"X-Request-Id": "none"})
            assert status == 401 and doc["error"]["code"] == "unauthorized"
            status, _ = await infer(http, guard.url, body, {"X-API-Key": KEY_B, "X-Request-Id": "unknown"})
            assert status == 401
            status, doc = await infer(http, guard.url, body, {"X-API-Key": KEY_A, "X-Request-Id": "ok"})
            assert status == 200 and "outputs" in doc
            status, _ = await infer(http, guard.url, body, {"Authorization": f"Bearer {KEY_A}"})
            assert status == 200
            status, _ = await infer(http, guard.url, body, {"Authorization": "Bearer anything-at-all-here"})
            assert status == 401
        (unknown,) = guard.events_for("unknown")
        assert unknown["guard"]["credential_error"] == "unknown api key"
        assert unknown["http"]["response"]["status_code"] == 401
        (ok,) = guard.events_for("ok")
        assert ok["guard"]["principal"] == "team-a"
        text = "\n".join(json.dumps(e) for e in guard.events)
        assert KEY_A not in text and KEY_B not in text

    async def test_unknown_keys_cannot_mint_sessions(self, tmp_path: Path, demo_model_url: str, start_guard,
                                                     demo_model: DigitsModel) -> None:
        """With a key store, invented keys fall back to the address: every one lands in the same session."""
        keys = write_keys(tmp_path / "keys.yaml", [{"name": "team-a", "key": KEY_A}])
        guard = await start_guard(demo_model_url, api_keys_file=str(keys))
        body = v2_body(demo_model.X_test[0])
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                status, _ = await infer(http, guard.url, body, {"X-API-Key": f"invented-{i:020d}",
                                                                "X-Request-Id": f"inv{i}"})
                assert status == 200  # the policy does not require keys
        sessions = {guard.events_for(f"inv{i}")[0]["guard"]["session"] for i in range(3)}
        assert len(sessions) == 1
        assert guard.events_for("inv0")[0]["guard"]["session_source"] == "address"

    async def test_per_key_rate_limit_and_models(self, tmp_path: Path, demo_model_url: str, start_guard,
                                                 demo_model: DigitsModel) -> None:
        """A key's own rate limit throttles it (429) while another key is unaffected; models outside its
        list get 403."""
        keys = write_keys(tmp_path / "keys.yaml", [
            {"name": "slow", "key": KEY_A, "rate_limit": {"rate": 0.01, "burst": 2}},
            {"name": "scoped", "key": KEY_B, "models": ["other-model"]},
        ])
        guard = await start_guard(demo_model_url, api_keys_file=str(keys))
        body = v2_body(demo_model.X_test[0])
        async with aiohttp.ClientSession() as http:
            statuses = [(await infer(http, guard.url, body, {"X-API-Key": KEY_A}))[0] for _ in range(4)]
            assert statuses == [200, 200, 429, 429]
            status, doc = await infer(http, guard.url, body, {"X-API-Key": KEY_B})
            assert status == 403 and doc["error"]["code"] == "model_not_allowed"
            status, _ = await infer(http, guard.url, body, {})
            assert status == 200

    async def test_key_file_reload_on_the_running_guard(self, tmp_path: Path, demo_model_url: str, start_guard,
                                                        demo_model: DigitsModel) -> None:
        """Rotating the key file takes effect within the reload interval; a broken file keeps the old keys."""
        (tmp_path / "policy.yaml").write_text(POLICY_REQUIRE)
        path = write_keys(tmp_path / "keys.yaml", [{"name": "a", "key": KEY_A}])
        guard = await start_guard(demo_model_url, policy=str(tmp_path / "policy.yaml"), api_keys_file=str(path))
        body = v2_body(demo_model.X_test[0])
        async with aiohttp.ClientSession() as http:
            assert (await infer(http, guard.url, body, {"X-API-Key": KEY_B}))[0] == 401
            write_keys(path, [{"name": "b", "key": KEY_B}])
            for _ in range(50):
                if (await infer(http, guard.url, body, {"X-API-Key": KEY_B}))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await infer(http, guard.url, body, {"X-API-Key": KEY_B}))[0] == 200
            assert (await infer(http, guard.url, body, {"X-API-Key": KEY_A}))[0] == 401
            path.write_text(f"keys:\n  - name: c\n    key: {KEY_C}: oops\n")  # broken, a new key on the bad line
            for _ in range(50):
                if any(e["message"].startswith("api_keys rejected") for e in guard.events):
                    break
                await asyncio.sleep(0.05)
            (rejected,) = [e for e in guard.events if e["message"].startswith("api_keys rejected")]
            assert "line 3" in rejected["error"]["message"]
            assert (await infer(http, guard.url, body, {"X-API-Key": KEY_B}))[0] == 200
        assert KEY_C not in "\n".join(json.dumps(e) for e in guard.events), "a key from the broken file was logged"


    async def test_passthrough_routes_require_credentials_too(self, tmp_path: Path, demo_model_url: str,
                                                              start_guard) -> None:
        """With require_credentials (and health_requires_credentials), unscored metadata and health routes also
        need a valid key (401 otherwise); a key scoped to other models may not read this model's metadata (403)
        but may read server health. (Health open by default: tests/integration/test_metadata_auth.py.)"""
        (tmp_path / "policy.yaml").write_text(POLICY_REQUIRE + "  health_requires_credentials: true\n")
        keys = write_keys(tmp_path / "keys.yaml", [{"name": "a", "key": KEY_A},
                                                   {"name": "scoped", "key": KEY_B, "models": ["other-model"]}])
        guard = await start_guard(demo_model_url, policy=str(tmp_path / "policy.yaml"), api_keys_file=str(keys))

        async def get(path: str, headers: dict[str, str]) -> int:
            async with http.get(guard.url + path, headers=headers) as r:
                await r.read()
                return r.status

        async with aiohttp.ClientSession() as http:
            assert await get("/v2/models/digits", {"X-Request-Id": "meta-anon"}) == 401
            assert await get("/v2/health/ready", {}) == 401
            assert await get("/v2/models/digits", {"X-API-Key": f"invented-{0:020d}"}) == 401
            assert await get("/v2/models/digits", {"X-API-Key": KEY_A}) == 200
            assert await get("/v2/health/ready", {"Authorization": f"Bearer {KEY_A}"}) == 200
            assert await get("/v2/models/digits", {"X-API-Key": KEY_B}) == 403
            assert await get("/v2/health/ready", {"X-API-Key": KEY_B}) == 200
        (event,) = guard.events_for("meta-anon")
        assert event["rule"]["name"] == "credentials-required"
        assert event["http"]["response"]["status_code"] == 401 and event["event"]["action"] == "reject"

    async def test_passthrough_without_required_credentials_stays_open(self, tmp_path: Path, demo_model_url: str,
                                                                       start_guard) -> None:
        """Without require_credentials, metadata and health routes answer without a key, as before."""
        keys = write_keys(tmp_path / "keys.yaml", [{"name": "a", "key": KEY_A}])
        guard = await start_guard(demo_model_url, api_keys_file=str(keys))
        async with aiohttp.ClientSession() as http:
            for path in ("/v2/models/digits", "/v2/health/ready"):
                async with http.get(guard.url + path) as r:
                    assert r.status == 200

    async def test_unexpected_reload_error_keeps_the_reload_loop(self, tmp_path: Path, demo_model_url: str,
                                                                  start_guard, demo_model: DigitsModel,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """An exception other than AuthError/TlsError while reloading is logged and counted, the guard keeps
        serving, and the next key rotation is still picked up."""
        (tmp_path / "policy.yaml").write_text(POLICY_REQUIRE)
        path = write_keys(tmp_path / "keys.yaml", [{"name": "a", "key": KEY_A}])
        guard = await start_guard(demo_model_url, policy=str(tmp_path / "policy.yaml"), api_keys_file=str(path))
        real = KeyStore.maybe_reload
        failures = [RuntimeError("unforeseen"), KeyError("bug")]

        def flaky(self: KeyStore) -> bool:
            if failures:
                raise failures.pop(0)
            return real(self)

        monkeypatch.setattr(KeyStore, "maybe_reload", flaky)
        body = v2_body(demo_model.X_test[0])

        def failed() -> float:
            value = guard.state.metrics.registry.get_sample_value(
                "inference_guard_credential_reloads_total", {"file": "api_keys", "result": "failed"})
            return value or 0.0

        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                if not failures and failed() >= 2:
                    break
                await asyncio.sleep(0.05)
            assert failed() == 2
            assert (await infer(http, guard.url, body, {"X-API-Key": KEY_A}))[0] == 200
            write_keys(path, [{"name": "b", "key": KEY_B}])
            for _ in range(100):
                if (await infer(http, guard.url, body, {"X-API-Key": KEY_B}))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await infer(http, guard.url, body, {"X-API-Key": KEY_B}))[0] == 200
        logged = [e for e in guard.events if e["message"].startswith("api_keys reload failed unexpectedly")]
        assert [e["error"]["message"] for e in logged] == ["RuntimeError: unforeseen", "KeyError: 'bug'"]


class TestJwtOnTheGuard:
    async def test_jwt_session_from_claim(self, tmp_path: Path, demo_model_url: str, start_guard,
                                          demo_model: DigitsModel) -> None:
        """Valid tokens pass and share a session per subject; expired or foreign tokens get 401."""
        (tmp_path / "policy.yaml").write_text(POLICY_REQUIRE)
        idp = Issuer("ES256", "e1")
        guard = await start_guard(demo_model_url, policy=str(tmp_path / "policy.yaml"),
                                  jwt_jwks_file=str(write_jwks(tmp_path / "jwks.json", idp)),
                                  jwt_issuer="https://idp.test", jwt_audience="guard")
        body = v2_body(demo_model.X_test[0])
        async with aiohttp.ClientSession() as http:
            for rid, token in (("a1", idp.token()), ("a2", idp.token(jti="other")), ("b1", idp.token(sub="bob"))):
                status, _ = await infer(http, guard.url, body, {"Authorization": f"Bearer {token}",
                                                                "X-Request-Id": rid})
                assert status == 200
            expired = idp.token(exp=int(time.time()) - 600)
            status, _ = await infer(http, guard.url, body, {"Authorization": f"Bearer {expired}",
                                                            "X-Request-Id": "exp"})
            assert status == 401
            status, _ = await infer(http, guard.url, body, {"Authorization": f"Bearer {Issuer('ES256', 'e1').token()}"})
            assert status == 401
            status, _ = await infer(http, guard.url, body, {"X-API-Key": KEY_A})
            assert status == 401  # no key store: a bare key proves nothing when JWTs are verified
        s = {rid: guard.events_for(rid)[0]["guard"]["session"] for rid in ("a1", "a2", "b1")}
        assert s["a1"] == s["a2"] != s["b1"]
        assert "ExpiredSignatureError" in guard.events_for("exp")[0]["guard"]["credential_error"]


def test_every_session_hash_is_hex(tmp_path: Path) -> None:
    """Sessions derived from keys, tokens and addresses are 32 hex characters (safe to log and list)."""
    from guard_agent.identity import IdentityResolver

    r = IdentityResolver(key=b"k", header="X-API-Key", sources=("header", "bearer", "address"), trusted_proxies=())
    r.use_credentials(keys=KeyStore(write_keys(tmp_path / "k.yaml", [{"name": "a", "key": KEY_A}])))
    ids = [r.resolve({"X-API-Key": KEY_A}, "127.0.0.1"), r.resolve({"X-API-Key": "nope"}, "127.0.0.1"),
           r.resolve({}, None)]
    assert [i.source for i in ids] == ["header", "address", "anonymous"]
    assert all(len(i.session) == 32 and int(i.session, 16) >= 0 for i in ids)
    assert np.unique([i.session for i in ids]).size == 3
