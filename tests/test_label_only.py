"""A label-only model (MLServer's sklearn runtime without ``predict_proba``): the guard keeps serving, says
in /readyz and a metric that the margin tracker is inactive and why, and takes it back when probabilities
come; without a profile, coverage and neighbours are reported inactive from the start."""

from __future__ import annotations

from typing import Any

import aiohttp
import numpy as np
import pytest

from guard_agent.tracking import LABELS_ONLY, NO_PROFILE, SessionTracking
from tests.conftest import DigitsData, GuardFactory, ModelServer, v2_body

SALT = b"label-only-salt"


async def _readyz(http: aiohttp.ClientSession, admin: str) -> tuple[int, dict[str, Any]]:
    async with http.get(admin + "/readyz") as r:
        return r.status, await r.json()


async def _metric(http: aiohttp.ClientSession, admin: str) -> str:
    async with http.get(admin + "/metrics") as r:
        return await r.text()


@pytest.mark.slow
async def test_label_only_answers_turn_the_margin_tracker_off(mlserver: ModelServer, digits: DigitsData,
                                                              start_guard: GuardFactory) -> None:
    """Requests that do not ask for predict_proba get labels only from MLServer: still ready (200), with
    session.margin listed as inactive for that reason and counted by inference_guard_tracker_inactive; asking
    for probabilities again clears it."""
    guard = await start_guard(mlserver.url)
    row = digits.X_test[:1]
    async with aiohttp.ClientSession() as http:
        async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(row, proba=False),
                             headers={"Content-Type": "application/json", "X-API-Key": "a"}) as r:
            assert r.status == 200
            assert "predict_proba" not in await r.text()
        status, doc = await _readyz(http, guard.admin_url)
        assert status == 200 and doc["ready"] is True
        assert doc["inactive_trackers"]["session.margin"] == LABELS_ONLY
        assert doc["inactive_trackers"]["session.coverage"] == NO_PROFILE  # no profile in this guard
        assert 'inference_guard_tracker_inactive{score="session.margin"} 1.0' in await _metric(http, guard.admin_url)
        async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(row),
                             headers={"Content-Type": "application/json", "X-API-Key": "a"}) as r:
            assert r.status == 200
        _, doc = await _readyz(http, guard.admin_url)
        assert "session.margin" not in doc["inactive_trackers"]
        assert 'inactive{score="session.margin"}' not in await _metric(http, guard.admin_url)
    assert any(e.get("message") == "session trackers inactive" for e in guard.events)


def test_changes_are_reported_once_each() -> None:
    """The callback hears each change of what the answers carry, not every request."""
    heard: list[dict[str, str]] = []
    tracking = SessionTracking({}, salt=SALT, on_inactive=lambda found: heard.append(dict(found)))
    for labels, proba in [(np.array([1]), None), (np.array([2]), None), (None, np.array([[0.2, 0.8]])),
                          (None, None)]:
        tracking._saw_answer(labels, proba)
    assert [("session.margin" in h, "session.fingerprint" in h) for h in heard] == [
        (True, False), (False, False), (True, True)]
