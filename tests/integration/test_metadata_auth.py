"""Credentials on the read-only passthrough routes, against a real MLServer: with ``access.require_credentials``
model metadata needs a valid API key or JWT (and a key limited to other models gets 403), plain health stays open
for probes unless ``access.health_requires_credentials`` closes it too; refusals log the same events as on
inference routes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guard_agent.policy import PolicyError
from guard_agent.policy.loader import parse_policy
from tests.conftest import DigitsData, GuardFactory, ModelServer, v2_body
from tests.integration.test_access import Issuer, write_jwks, write_keys

pytestmark = pytest.mark.slow

KEY_ALL = "kall-" + "3c5e7a9b1d2f4a6c8e0b"
KEY_OTHER = "koth-" + "9a8b7c6d5e4f3a2b1c0d"
KEY_INVENTED = "kinv-" + "0000111122223333aaaa"
REQUIRE = "version: 1\nmode: enforce\naccess:\n  require_credentials: true\n"
REQUIRE_HEALTH = REQUIRE + "  health_requires_credentials: true\n"
METADATA = ("/v2/models/digits", "/v2/models/digits/ready", "/v2/models/digits/versions/v1",
            "/v2/models/digits/versions/v1/ready", "/v1/models/digits", "/v1/models/digits/metadata")
HEALTH = ("/v2", "/v2/health/live", "/v2/health/ready", "/ping", "/health")
GUARD_AGENT = str(Path(sys.executable).parent / "guard-agent")


def policy_file(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def keys_file(tmp_path: Path) -> str:
    return str(write_keys(tmp_path / "keys.yaml", [{"name": "all-models", "key": KEY_ALL},
                                                   {"name": "other-only", "key": KEY_OTHER,
                                                    "models": ["other-model"]}]))


async def get(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    async with http.get(url, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.read()


def refusal_shape(event: dict[str, Any]) -> tuple[Any, ...]:
    """The parts of a decision event that say 'refused for access reasons' (not the route-specific ones)."""
    return (event["event"]["kind"], event["event"]["action"], event["event"]["outcome"], event["rule"]["name"],
            event["http"]["response"]["status_code"])


class TestMetadataNeedsCredentials:
    async def test_metadata_closed_health_open_by_default(self, tmp_path: Path, mlserver: ModelServer,
                                                          start_guard: GuardFactory) -> None:
        """require_credentials alone: every model-metadata route answers 401 without a key (the model server is
        never asked) and MLServer's metadata with one; plain health answers without a key."""
        guard = await start_guard(mlserver.url, policy=policy_file(tmp_path, REQUIRE),
                                  api_keys_file=keys_file(tmp_path))
        async with aiohttp.ClientSession() as http:
            for i, path in enumerate(METADATA):
                status, headers, body = await get(http, guard.url + path, {"X-Request-Id": f"anon-{i}"})
                assert status == 401, path
                assert headers["WWW-Authenticate"] == 'Bearer realm="inference-guard"'
                assert json.loads(body)["error"]["code"] == "unauthorized"
            status, _, body = await get(http, guard.url + "/v2/models/digits", {"X-API-Key": KEY_ALL})
            assert status == 200 and json.loads(body)["name"] == "digits"
            status, _, _ = await get(http, guard.url + "/v2/models/digits/ready",
                                     {"Authorization": f"Bearer {KEY_ALL}"})
            assert status == 200
            for i, path in enumerate(HEALTH):
                status, _, _ = await get(http, guard.url + path, {"X-Request-Id": f"probe-{i}"})
                # MLServer serves the v2 ones and has no /ping or /health: what matters is that it was asked
                assert status == (200 if path.startswith("/v2") else 404), path
        for i, path in enumerate(METADATA):
            (event,) = guard.events_for(f"anon-{i}")
            assert refusal_shape(event) == ("event", "reject", "failure", "credentials-required", 401), path
            assert event["guard"]["model"] == "digits" and event["url"]["path"] == path
        for i in range(len(HEALTH)):
            (event,) = guard.events_for(f"probe-{i}")
            assert event["event"]["outcome"] == "success" and event["rule"]["name"] == "passthrough"

    async def test_key_limited_to_other_models_gets_403(self, tmp_path: Path, mlserver: ModelServer,
                                                        start_guard: GuardFactory) -> None:
        """A valid key whose list excludes this model gets 403 on this model's metadata (logged with its
        principal), exactly as on its inference route; it may still read plain health."""
        guard = await start_guard(mlserver.url, policy=policy_file(tmp_path, REQUIRE),
                                  api_keys_file=keys_file(tmp_path))
        scoped = {"X-API-Key": KEY_OTHER}
        async with aiohttp.ClientSession() as http:
            for i, path in enumerate(METADATA):
                status, _, body = await get(http, guard.url + path, {**scoped, "X-Request-Id": f"meta-{i}"})
                assert status == 403, path
                assert json.loads(body)["error"]["code"] == "model_not_allowed"
            async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body([[0.0] * 64]),
                                 headers={**scoped, "Content-Type": "application/json",
                                          "X-Request-Id": "infer"}) as r:
                assert r.status == 403
            assert (await get(http, guard.url + "/v2/health/ready", scoped))[0] == 200
        (infer_event,) = guard.events_for("infer")
        for i in range(len(METADATA)):
            (event,) = guard.events_for(f"meta-{i}")
            assert refusal_shape(event) == refusal_shape(infer_event) == (
                "event", "reject", "failure", "model-not-allowed", 403)
            assert event["guard"]["principal"] == infer_event["guard"]["principal"] == "other-only"

    async def test_unknown_key_and_jwt(self, tmp_path: Path, mlserver: ModelServer, start_guard: GuardFactory,
                                       digits: DigitsData) -> None:
        """An invented key is 401 on metadata with the same event as on inference (reason logged, key not);
        a verified JWT opens metadata, an expired one does not."""
        idp = Issuer("ES256", "m1")
        guard = await start_guard(mlserver.url, policy=policy_file(tmp_path, REQUIRE),
                                  api_keys_file=keys_file(tmp_path),
                                  jwt_jwks_file=str(write_jwks(tmp_path / "jwks.json", idp)),
                                  jwt_issuer="https://idp.test", jwt_audience="guard")
        invented = {"X-API-Key": KEY_INVENTED}
        async with aiohttp.ClientSession() as http:
            assert (await get(http, guard.url + "/v2/models/digits", {**invented, "X-Request-Id": "meta"}))[0] == 401
            async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(digits.X_test[:1]),
                                 headers={**invented, "Content-Type": "application/json",
                                          "X-Request-Id": "infer"}) as r:
                assert r.status == 401
            bearer = {"Authorization": f"Bearer {idp.token()}"}
            assert (await get(http, guard.url + "/v2/models/digits", bearer))[0] == 200
            expired = {"Authorization": f"Bearer {idp.token(exp=1)}"}
            assert (await get(http, guard.url + "/v2/models/digits/ready", expired))[0] == 401
        (meta,), (infer,) = guard.events_for("meta"), guard.events_for("infer")
        assert refusal_shape(meta) == refusal_shape(infer) == ("event", "reject", "failure",
                                                               "credentials-required", 401)
        assert meta["guard"]["credential_error"] == infer["guard"]["credential_error"] == "unknown api key"
        assert KEY_INVENTED not in "\n".join(json.dumps(e) for e in guard.events)

    async def test_health_closed_when_the_policy_asks(self, tmp_path: Path, mlserver: ModelServer,
                                                      start_guard: GuardFactory) -> None:
        """With health_requires_credentials, plain health also answers 401 without a key and 200 with one."""
        guard = await start_guard(mlserver.url, policy=policy_file(tmp_path, REQUIRE_HEALTH),
                                  api_keys_file=keys_file(tmp_path))
        async with aiohttp.ClientSession() as http:
            for i, path in enumerate(HEALTH):
                status, headers, _ = await get(http, guard.url + path, {"X-Request-Id": f"probe-{i}"})
                assert status == 401, path
                assert "WWW-Authenticate" in headers
            for path in ("/v2", "/v2/health/ready"):
                assert (await get(http, guard.url + path, {"X-API-Key": KEY_OTHER}))[0] == 200
        for i in range(len(HEALTH)):
            (event,) = guard.events_for(f"probe-{i}")
            assert refusal_shape(event) == ("event", "reject", "failure", "credentials-required", 401)
            assert event["guard"]["model"] is None

    async def test_setting_follows_policy_reloads(self, tmp_path: Path, mlserver: ModelServer,
                                                  start_guard: GuardFactory) -> None:
        """The access section is hot-reloaded like the rest of the policy: closing health, then opening
        everything, takes effect on the running guard without a restart."""
        path = policy_file(tmp_path, REQUIRE)
        guard = await start_guard(mlserver.url, policy=path, api_keys_file=keys_file(tmp_path))
        admin = {"Authorization": "Bearer test-admin-token"}
        async with aiohttp.ClientSession() as http:
            assert (await get(http, guard.url + "/v2/health/ready"))[0] == 200
            policy_file(tmp_path, REQUIRE_HEALTH)
            async with http.post(guard.admin_url + "/admin/reload", headers=admin) as r:
                assert r.status == 200
            assert (await get(http, guard.url + "/v2/health/ready"))[0] == 401
            policy_file(tmp_path, "version: 1\nmode: enforce\n")
            async with http.post(guard.admin_url + "/admin/reload", headers=admin) as r:
                assert r.status == 200
            assert (await get(http, guard.url + "/v2/health/ready"))[0] == 200
            assert (await get(http, guard.url + "/v2/models/digits"))[0] == 200

    async def test_per_model_override(self, tmp_path: Path, mlserver: ModelServer,
                                      start_guard: GuardFactory) -> None:
        """Metadata follows the named model's access section: a model that requires credentials under a
        global policy that does not is closed, health and other models stay open."""
        text = "version: 1\nmode: enforce\nmodels:\n  digits:\n    access:\n      require_credentials: true\n"
        guard = await start_guard(mlserver.url, policy=policy_file(tmp_path, text),
                                  api_keys_file=keys_file(tmp_path))
        async with aiohttp.ClientSession() as http:
            assert (await get(http, guard.url + "/v2/models/digits"))[0] == 401
            assert (await get(http, guard.url + "/v2/models/digits", {"X-API-Key": KEY_ALL}))[0] == 200
            assert (await get(http, guard.url + "/v2/models/unknown-model"))[0] == 404  # MLServer's answer
            assert (await get(http, guard.url + "/v2/health/ready"))[0] == 200


class TestPolicyValidation:
    def test_defaults_and_accepted_forms(self) -> None:
        """Health is open unless asked; the flag is read at the top level with require_credentials."""
        default = parse_policy("version: 1\n").policy.default
        assert not default.credentials_required() and not default.credentials_required(health=True)
        required = parse_policy(REQUIRE).policy.default
        assert required.credentials_required() and not required.credentials_required(health=True)
        closed = parse_policy(REQUIRE_HEALTH).policy.default
        assert closed.credentials_required() and closed.credentials_required(health=True)

    @pytest.mark.parametrize(("text", "field", "line", "words"), [
        ("version: 1\naccess:\n  health_requires_credentials: true\n",
         "access.health_requires_credentials", 3, "require_credentials: true"),
        ("version: 1\naccess:\n  require_credentials: false\n  health_requires_credentials: true\n",
         "access.health_requires_credentials", 4, "require_credentials: true"),
        ("version: 1\naccess:\n  require_credentials: true\n  health_requires_credentials: 'yes'\n",
         "access.health_requires_credentials", 4, "true or false"),
        ("version: 1\naccess:\n  require_credentials: true\nmodels:\n  digits:\n    access:\n"
         "      health_requires_credentials: true\n",
         "models.digits.access.health_requires_credentials", 7, "top level"),
        ("version: 1\naccess:\n  require_credentials: true\n  open_health: true\n",
         "access.open_health", 4, "health_requires_credentials"),
    ])
    def test_invalid_settings_are_refused(self, text: str, field: str, line: int, words: str) -> None:
        """Each mistake is refused with the field, its line and what to change."""
        with pytest.raises(PolicyError) as info:
            parse_policy(text, source="p.yaml")
        assert info.value.field == field and info.value.line == line
        assert words in info.value.message

    def test_guard_agent_check(self, tmp_path: Path) -> None:
        """``guard-agent check`` accepts the shipped form and refuses a model-level flag with file and line."""
        good = policy_file(tmp_path, REQUIRE_HEALTH, "good.yaml")
        bad = policy_file(tmp_path, REQUIRE + "models:\n  digits:\n    access:\n"
                                              "      health_requires_credentials: false\n", "bad.yaml")
        ok = subprocess.run([GUARD_AGENT, "check", good], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run([GUARD_AGENT, "check", bad], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert f"{bad}:8: models.digits.access.health_requires_credentials: set only at the top level" \
            in refused.stderr
