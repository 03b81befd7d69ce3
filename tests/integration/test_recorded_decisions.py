"""Recorded traffic: the guard decides the same on a fixed mix of benign and attack traffic as when recorded.

A speed change to the request path (scoring, trackers, sessions, metrics) must not change a single
decision. The traffic is sent sequentially to the real guard (default policy, a profile fitted on digits)
in front of the built-in digits v2 model server: benign sessions, batches, out-of-range and
out-of-distribution inputs, invalid requests, a black-box boundary search (one key) and the same search
spread over many keys (sybil). For every request the recording holds the status, action, rule and the
scores: the stateless detectors' to 1e-6, the session trackers' to 0.02 (their evidence decays with the wall
clock, so a slower run reads slightly lower ones), ``session.rate`` and ``session.risk`` (which follows it)
not at all: their decisions are compared all the same.

Re-record (only when a change is *meant* to change decisions, e.g. a new calibration, and say so in the
commit): ``GUARD_RECORD_DECISIONS=1 pytest tests/integration/test_recorded_decisions.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from guard_agent.demo import DigitsModel
from tests.conftest import DigitsData, GuardFactory, v2_body

RECORDING = Path(__file__).parent / "data" / "recorded_decisions.json"
CLOCK_SCORES = frozenset({"session.rate", "session.risk"})
DIGITS = 6
STATELESS_TOLERANCE = 1e-6  # float summation order may differ; no decision threshold is that close
SESSION_TOLERANCE = 0.02  # session evidence decays with time between requests


def _traffic(d: DigitsData, model: DigitsModel) -> list[tuple[str, bytes]]:
    """(API key, body) in sending order: the same on every run (fixed seeds, fixed rows)."""
    rng = np.random.default_rng(20261207)
    x = d.X_test
    out: list[tuple[str, bytes]] = []
    for s in range(30):  # benign: 30 sessions of 4 distinct held-out rows each
        out += [(f"benign-{s}", v2_body(x[(s * 4 + i) % len(x)])) for i in range(4)]
    for s in range(4):  # benign batches of 8 rows
        out.append((f"batch-{s}", v2_body(x[100 + s * 8 : 108 + s * 8])))
    out += [(f"noise-{i}", v2_body(rng.uniform(0, 16, size=64))) for i in range(6)]  # out of distribution
    out += [("range", v2_body(np.full(64, 100.0)))]  # outside the learned range
    out += [("nan", b'{"inputs":[{"name":"x","shape":[1,64],"datatype":"FP64","data":[' + b"NaN," * 63 + b"1]}]}")]
    out += [("short", v2_body(x[0][:10]))]  # wrong feature count
    # a boundary search between two rows of different classes: the pattern of HopSkipJump's binary searches,
    # steered by the served model's answers (which the attacker gets back), then probes around the boundary
    a, b = x[np.argmax(d.y_test == 1)], x[np.argmax(d.y_test == 7)]
    label = int(model.predict_proba(a[None]).argmax())
    lo, hi = 0.0, 1.0
    steps = []
    for _ in range(12):
        mid = (lo + hi) / 2
        steps.append(mid)
        lo, hi = (lo, mid) if int(model.predict_proba((a + mid * (b - a))[None]).argmax()) != label else (mid, hi)
    steps += [hi] * 49
    search = [a + t * (b - a) + rng.normal(0, 0.05, 64) for t in steps]
    out += [("hsj-one-key", v2_body(np.clip(row, 0, 16))) for row in search]
    out += [(f"hsj-sybil-{i % 12}", v2_body(np.clip(row + 0.01, 0, 16))) for i, row in enumerate(search)]
    return out


def _secret(key: str) -> str:
    return f"recorded-traffic-{key}"  # 16+ characters, as a key file requires


def _record(event: dict[str, Any]) -> dict[str, Any]:
    scores = (event.get("guard") or {}).get("scores") or {}
    return {
        "status": event["http"]["response"]["status_code"],
        "action": event["event"]["action"],
        "rule": event["rule"]["name"],
        "scores": {k: round(float(v), DIGITS) for k, v in sorted(scores.items()) if k not in CLOCK_SCORES},
    }


async def test_decisions_match_the_recording(start_guard: GuardFactory, demo_model_url: str, tmp_path: Path,
                                             digits_profile: str, digits: DigitsData,
                                             demo_model: DigitsModel) -> None:
    """Every request of the fixed traffic gets the recorded status, action, rule and scores."""
    traffic = _traffic(digits, demo_model)
    # verified keys: each key is its own session (an unverified one would also count against the one session of
    # 127.0.0.1, which all this traffic shares)
    keys = tmp_path / "keys.json"
    keys.write_bytes(orjson.dumps({"keys": [{"name": k, "key": _secret(k)} for k in sorted({k for k, _ in traffic})]}))
    guard = await start_guard(demo_model_url, profile=digits_profile, api_keys_file=str(keys))
    seen: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        for i, (key, body) in enumerate(traffic):
            rid = f"rec-{i}"
            async with http.post(f"{guard.url}/v2/models/digits/infer", data=body,
                                 headers={"X-API-Key": _secret(key), "X-Request-Id": rid,
                                          "Content-Type": "application/json"}) as resp:
                await resp.read()
            events = guard.events_for(rid)
            assert len(events) == 1, f"request {i}: {len(events)} events"
            seen.append({"i": i, "key": key, **_record(events[0])})
    if os.environ.get("GUARD_RECORD_DECISIONS") == "1":
        RECORDING.write_bytes(orjson.dumps(seen, option=orjson.OPT_INDENT_2) + b"\n")
    recorded = orjson.loads(RECORDING.read_bytes())
    actions = {r["action"] for r in recorded}
    assert {"allow", "block", "reject"} <= actions, f"the recording must mix decisions, has {actions}"
    assert len(seen) == len(recorded)
    diffs = [d for r, s in zip(recorded, seen, strict=True) if (d := _differences(r, s))]
    assert not diffs, f"{len(diffs)} of {len(seen)} requests decided differently, first: {diffs[:3]}"


def _differences(recorded: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    """What differs between a recorded and a seen request, within the score tolerances."""
    out = {k: (recorded[k], seen[k]) for k in ("status", "action", "rule") if recorded[k] != seen[k]}
    a, b = recorded["scores"], seen["scores"]
    if set(a) != set(b):
        out["score names"] = (sorted(a), sorted(b))
    for name in set(a) & set(b):
        tolerance = SESSION_TOLERANCE if name.startswith("session.") else STATELESS_TOLERANCE
        if abs(a[name] - b[name]) > tolerance:
            out[name] = (a[name], b[name])
    return {"i": recorded["i"], **out} if out else {}
