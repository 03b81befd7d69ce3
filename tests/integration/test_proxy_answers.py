"""The model's answer on the way back: decoded once for trackers and hardening, hardened where it can be."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

import guard_agent.protocols._json as protocols_json
import guard_agent.protocols.hardening as protocols_hardening
import guard_agent.protocols.responses as protocols_responses
from guard_agent.demo import DigitsModel, make_model_app
from guard_agent.policy import parse_policy
from guard_agent.protocols import ParsedResponse
from guard_agent.settings import CustomRoute
from guard_agent.state import NoTrackers
from guard_agent.tuning import read_capture, replay
from tests._support.servers import serve_app
from tests.conftest import v2_body

JSON = {"Content-Type": "application/json"}
# a session-score rule that never matches (so the trackers run and read the answer) and a harden rule that
# always does (so the answer is rewritten too)
POLICY = """version: 1
mode: enforce
hardening: {round_digits: 1}
rules:
  - id: watch-sessions
    when: {session.rate: {gt: 1.0}}
    action: block
  - id: harden-all
    when: {request.rows: {gte: 1}}
    action: harden
"""


@pytest.fixture
def model_calls() -> list[str]:
    """The paths of every request the model server received, in order."""
    return []


@pytest.fixture
async def model_url(demo_model: DigitsModel, model_calls: list[str]) -> AsyncIterator[str]:
    """The built-in digits v2 model server on a free loopback port, plus a custom ``/score`` route; every
    request it receives is recorded in ``model_calls``."""
    app = make_model_app(demo_model)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        model_calls.append(request.path)
        return await handler(request)

    async def score(request: web.Request) -> web.Response:
        x = np.asarray((await request.json())["x"], dtype=np.float64)
        return web.json_response({"y": x.sum(axis=1).tolist()})

    app.middlewares.append(record)
    app.router.add_post("/score", score)
    async with serve_app(app) as url:
        yield url


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every upstream answer the guard decodes (``loads_response`` wherever the protocols import it)."""
    calls: list[bytes] = []
    real = protocols_json.loads_response

    def counting(body: bytes) -> Any:
        calls.append(body)
        return real(body)

    for module in (protocols_json, protocols_responses, protocols_hardening):
        monkeypatch.setattr(module, "loads_response", counting, raising=False)
    return calls


class RecordingTrackers(NoTrackers):
    """Stands in for the session trackers: keeps what the proxy handed them as the model's answer."""

    def __init__(self) -> None:
        self.answers: list[Any] = []

    async def update(self, session: str, record: Any, features: Any, model: str | None, response: Any, now: float,
                     scores: Any) -> dict[str, float]:
        self.answers.append(response)
        return {}


class TestAnswerDecodedOnce:
    async def test_trackers_and_hardening_share_one_decode(self, tmp_path: Path, model_url: str, start_guard,
                                                           decodes: list[bytes]) -> None:
        """With session trackers and hardening both active, the upstream JSON is decoded once per request, and
        the client still gets the rounded answer."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        guard = await start_guard(model_url, policy=str(policy))
        assert guard.state.policies.current.default.needs_session_scores
        trackers = RecordingTrackers()
        guard.state.trackers = trackers
        x = np.random.default_rng(0).uniform(0, 16, (2, 64))
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + "/v2/models/digits/infer", data=v2_body(x),
                headers={**JSON, "X-Request-Id": "once-1"}) as r:
            assert r.status == 200
            doc = orjson.loads(await r.read())
        assert len(decodes) == 1, f"the answer was decoded {len(decodes)} times"
        (answer,) = trackers.answers
        assert isinstance(answer, ParsedResponse) and answer.probabilities is not None
        assert answer.probabilities.shape == (2, 10)
        data = next(o["data"] for o in doc["outputs"] if o["name"] == "predict_proba")
        assert data == [round(v, 1) for v in data]
        (event,) = guard.events_for("once-1")
        assert event["event"]["action"] == "harden" and event["guard"]["hardening"] == "applied"


    async def test_custom_route_answer_is_not_decoded(self, tmp_path: Path, model_url: str, start_guard,
                                                      decodes: list[bytes]) -> None:
        """A custom route's answer has no known shape (neither the trackers nor hardening can read it): with
        session rules on it is passed through undecoded, and the trackers are told there is no answer."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.split("  - id: harden-all")[0])  # the session rule only
        guard = await start_guard(model_url, policy=str(policy), routes=(CustomRoute(path="/score", pointer="/x"),))
        assert guard.state.policies.current.default.needs_session_scores
        trackers = RecordingTrackers()
        guard.state.trackers = trackers
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + "/score", json={"x": [[1.0, 2.0]]}, headers={"X-Request-Id": "custom-once"}) as r:
            assert r.status == 200
            assert await r.json() == {"y": [3.0]}
        assert decodes == [], "a custom route's answer was decoded"
        assert trackers.answers == [None]
        (event,) = guard.events_for("custom-once")
        assert event["event"]["action"] == "allow"


HARDEN_ROWS = "version: 1\nmode: enforce\nrules:\n  - id: many-rows\n    when: {request.rows: {gte: 1}}\n" \
              "    action: harden\n"
FLAG_ROWS = HARDEN_ROWS.replace("action: harden", "action: flag")


class TestHardeningOnCustomRoutes:
    async def test_harden_on_a_custom_route_blocks_that_request(self, tmp_path: Path, model_url: str,
                                                               model_calls: list[str], start_guard) -> None:
        """A custom route's answer cannot be hardened: the guard starts (with a warning naming the rule and the
        route), a request decided 'harden' there is refused with 403 before reaching the model, and the
        session gets no cool-down (the rule asked for less than a block)."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(HARDEN_ROWS)
        guard = await start_guard(model_url, policy=str(policy), routes=(CustomRoute(path="/score", pointer="/x"),))
        model_calls.clear()  # the guard's own start-up probes
        warnings = [e for e in guard.events if "cannot be hardened" in e.get("message", "")]
        assert warnings and "'many-rows'" in warnings[0]["error"]["message"]
        assert "POST /score" in warnings[0]["error"]["message"]
        async with aiohttp.ClientSession() as http:
            for i in range(2):
                async with http.post(guard.url + "/score", json={"x": [[1.0, 2.0]]},
                                     headers={"X-Request-Id": f"custom-{i}"}) as r:
                    assert r.status == 403
                    assert (await r.json())["error"]["code"] == "blocked"
        for i in range(2):
            (event,) = guard.events_for(f"custom-{i}")
            assert event["event"]["action"] == "block" and event["rule"]["name"] == "many-rows"
            assert event["guard"]["hardening"] == "unsupported"
        assert "/score" not in model_calls, "a request decided 'harden' on a custom route reached the model"

    async def test_replaying_the_same_policy_over_a_custom_route_capture_changes_nothing(
            self, tmp_path: Path, model_url: str, model_calls: list[str], start_guard) -> None:
        """The capture of those blocks, replayed under the policy that produced them, re-decides every request
        identically (replay uses the same decide() as the proxy, so no 'block -> harden' differences)."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(HARDEN_ROWS.replace("{gte: 1}", "{gte: 2}"))  # harden batches only: both outcomes seen
        guard = await start_guard(model_url, policy=str(policy), routes=(CustomRoute(path="/score", pointer="/x"),),
                                  capture_dir=str(tmp_path / "capture"))
        async with aiohttp.ClientSession() as http:
            for i, rows in enumerate((1, 2, 1, 3)):
                async with http.post(guard.url + "/score", json={"x": [[1.0, 2.0]] * rows},
                                     headers={"X-Request-Id": f"cap-{i}"}) as r:
                    assert r.status == (200 if rows == 1 else 403)
        assert model_calls.count("/score") == 2
        assert guard.state.capture is not None
        guard.state.capture.close()  # flushes the capture file, as on shutdown
        capture = read_capture([tmp_path / "capture"])
        assert [d.action for d in capture.decisions] == ["allow", "block", "allow", "block"]
        result = replay(capture, parse_policy(policy.read_text()).policy)
        assert result.total == 4
        assert result.changes == [] and result.fidelity_mismatches == []

    async def test_reload_to_harden_over_a_custom_route_is_accepted_with_a_warning(
            self, tmp_path: Path, model_url: str, start_guard) -> None:
        """Reloading into such a policy succeeds (the default policy hardens) and says why requests there will be
        blocked."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(FLAG_ROWS)
        guard = await start_guard(model_url, policy=str(policy), routes=(CustomRoute(path="/score", pointer="/x"),))
        assert not [e for e in guard.events if "cannot be hardened" in e.get("message", "")]
        good = guard.state.policies.current.revision
        policy.write_text(HARDEN_ROWS)
        async with aiohttp.ClientSession() as http, http.post(
                guard.admin_url + "/admin/reload", headers={"Authorization": "Bearer test-admin-token"}) as r:
            assert r.status == 200
        assert guard.state.policies.current.revision != good
        assert len([e for e in guard.events if "cannot be hardened" in e.get("message", "")]) == 1
        policy.write_text(HARDEN_ROWS)  # the same policy again: the watcher sees a new file identity
        for _ in range(2):
            async with aiohttp.ClientSession() as http, http.post(
                    guard.admin_url + "/admin/reload", headers={"Authorization": "Bearer test-admin-token"}) as r:
                assert r.status == 200
        assert len([e for e in guard.events if "cannot be hardened" in e.get("message", "")]) == 1, \
            "the warning was repeated for an unchanged policy"
