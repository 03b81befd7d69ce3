"""The guard with a fitted profile, session trackers and feature squeezing, in front of the real MLServer."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests._support.servers import ServePost
from tests.conftest import DigitsData, ModelServer, v2_body

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
JSON = {"Content-Type": "application/json"}


async def post(http: aiohttp.ClientSession, url: str, body: bytes, key: str, rid: str) -> int:
    async with http.post(url + INFER, data=body, headers={**JSON, "X-API-Key": key, "X-Request-Id": rid}) as r:
        await r.read()
        return r.status


class TestProfileInTheGuard:
    async def test_ood_blocked_in_distribution_passes(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                                      digits_profile: str, digits: DigitsData) -> None:
        """With a fitted profile, a noise image is blocked and held-out digits pass, on the real MLServer."""
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nrules:\n  - id: ood\n    when: {ood.combined: {gte: 0.99}}\n"
                          "    action: block\n")
        guard = await start_guard(mlserver.url, policy=str(policy), profile=digits_profile)
        rng = np.random.default_rng(0)
        async with aiohttp.ClientSession() as http:
            ok = [await post(http, guard.url, v2_body(x), f"benign-{i}", f"in-{i}")
                  for i, x in enumerate(digits.X_test[:20])]
            bad = [await post(http, guard.url, v2_body(rng.uniform(0, 16, 64)), f"noise-{i}", f"ood-{i}")
                   for i in range(5)]
        assert bad == [403] * 5
        assert ok.count(200) >= 19  # 1% target FPR: at most one of 20 normal digits may be refused
        (event,) = guard.events_for("ood-0")
        assert event["rule"]["name"] == "ood"
        assert event["guard"]["profile_revision"] == guard.state.profile.revision
        assert event["guard"]["scores"]["ood.combined"] >= 0.99
        assert {"ood.knn", "ood.mahalanobis", "ood.pca", "ood.iforest", "input.schema"} <= \
            set(event["guard"]["scores"])

    async def test_profile_mismatched_feature_count_is_400(self, mlserver: ModelServer, start_guard,
                                                           digits_profile: str) -> None:
        """A request whose feature count differs from the profile's is invalid (400), not scored."""
        guard = await start_guard(mlserver.url, profile=digits_profile)
        async with aiohttp.ClientSession() as http, http.post(guard.url + INFER, data=v2_body(np.ones(63)),
                                                              headers=JSON) as r:
            assert r.status == 400
            assert "expected 64 features" in (await r.json())["error"]["message"]


class TestSessionTrackersInTheGuard:
    async def test_near_duplicate_probing_is_blocked(self, mlserver: ModelServer, start_guard,
                                                     digits_profile: str, digits: DigitsData) -> None:
        """A HopSkipJump-like stream of near-duplicates from one key is blocked within a few dozen queries,
        while a benign key sending held-out digits is not."""
        guard = await start_guard(mlserver.url, profile=digits_profile)
        rng = np.random.default_rng(1)
        base = digits.X_test[3]
        async with aiohttp.ClientSession() as http:
            statuses = []
            for i in range(60):
                x = np.clip(base + rng.normal(0, 0.5, 64) * (1 + i % 5) / 5, 0, 16)
                statuses.append(await post(http, guard.url, v2_body(x), "prober", f"probe-{i}"))
                if statuses[-1] == 403:
                    break
        # the benign client is another client (another address): an unregistered key from the prober's address
        # would share that address's tracker evidence
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))) as http:
            benign = [await post(http, guard.url, v2_body(x), "benign", f"b-{i}")
                      for i, x in enumerate(digits.X_test[100:160])]
        assert 403 in statuses and statuses.index(403) < 40
        assert benign.count(200) == len(benign)
        blocked = guard.events_for(f"probe-{statuses.index(403)}")[0]
        assert blocked["threat"]["technique"]["id"] in ("AML.T0043.001", "AML.T0024.002")


class TestSqueezing:
    async def test_squeeze_scores_on_real_model(self, mlserver: ModelServer, start_guard, tmp_path: Path,
                                                 digits: DigitsData) -> None:
        """With squeezing enabled, adv.squeeze is computed from extra calls to the real model, which the client
        never sees, and stays low for a normal digit."""
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nsqueeze: {enabled: true, kind: tabular}\nfailure: {budget_ms: 2000}\n")
        guard = await start_guard(mlserver.url, policy=str(policy))
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + INFER, data=v2_body(digits.X_test[5]),
                headers={**JSON, "X-Request-Id": "sq-1"}) as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["outputs"][0]["shape"] == [1, 10]
        (event,) = guard.events_for("sq-1")
        assert 0.0 <= event["guard"]["scores"]["adv.squeeze"] < 0.5

    async def test_squeeze_budget_overrun_fails_closed(self, start_guard, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       serve_post: ServePost) -> None:
        """When the squeeze call overruns the budget, a fail-closed policy blocks the request."""
        import asyncio

        from aiohttp import web

        async def slow_infer(request: web.Request) -> web.Response:
            await asyncio.sleep(1.0)
            return web.json_response({"outputs": []})

        upstream = await serve_post(INFER, slow_infer)
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nsqueeze: {enabled: true}\nfailure: {on_budget: closed, budget_ms: 50}\n")
        guard = await start_guard(upstream, policy=str(policy))
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + INFER, data=v2_body(np.ones(4)), headers={**JSON, "X-Request-Id": "sq-2"}) as r:
            assert r.status == 403
        (event,) = guard.events_for("sq-2")
        assert event["rule"]["name"] == "scoring-budget"
