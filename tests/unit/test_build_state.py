"""``build_state`` builds the whole guard, the one ``guard-agent run`` serves: credentials, policy checks and
reloads are part of the state, not added by the listener start-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from guard_agent.app import build_state
from guard_agent.events import CallbackSink
from guard_agent.settings import ConfigError, CustomRoute, Settings
from guard_agent.state import GuardState

KEY = "ka-" + "a1b2c3d4e5f6a7b8c9d0"
HARDEN = "version: 1\nmode: enforce\nrules:\n  - id: extraction\n    when: {request.rows: {gte: 100}}\n" \
         "    action: harden\n"


def _build(events: list[dict[str, Any]], **settings: Any) -> GuardState:
    return build_state(Settings(hmac_key="unit-test-key", **settings),
                       sink=CallbackSink(lambda line: events.append(orjson.loads(line))))


def test_api_keys_are_verified_by_the_built_state(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "a", "key": KEY}]}))
    events: list[dict[str, Any]] = []
    state = _build(events, api_keys_file=str(keys))
    known = state.identity.resolve({"X-API-Key": KEY}, "127.0.0.1")
    unknown = state.identity.resolve({"X-API-Key": "kz-" + "0" * 20}, "127.0.0.1")
    assert known.authenticated and known.principal == "a"
    assert not unknown.authenticated
    assert [name for name, _ in state.credential_files] == ["api_keys"]
    assert any(e["message"] == "api keys loaded" for e in events)


def test_a_bad_key_file_stops_the_build(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "a", "key": "short"}]}))
    with pytest.raises(ConfigError):
        _build([], api_keys_file=str(keys))


def test_the_unhardenable_policy_warning_is_part_of_the_build(tmp_path: Path) -> None:
    """Said at build (not only when listeners start), and again when a reload activates such a policy."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nmode: enforce\n")
    events: list[dict[str, Any]] = []
    state = _build(events, policy=str(policy), routes=(CustomRoute(path="/score", pointer="/x"),))

    def warned() -> int:
        return sum("cannot be hardened" in e["message"] for e in events)

    assert warned() == 0
    policy.write_text(HARDEN)
    ok, error = state.reloader.policy("admin")
    assert ok and error is None
    assert warned() == 1
