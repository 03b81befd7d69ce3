"""Natural-data extraction through the guard with the default policy, in front of the real MLServer: the thief's
crawl is hardened (top-1 class, rounded) before anything blocks it; a heavy batch client is answered in full."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from tests.conftest import DigitsData, ModelServer, v2_body

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
JSON = {"Content-Type": "application/json"}


async def infer(http: aiohttp.ClientSession, url: str, rows: np.ndarray, key: str,
                rid: str) -> tuple[int, np.ndarray | None]:
    """Status and the answered probabilities (rows x classes), None when refused."""
    async with http.post(url + INFER, data=v2_body(rows), headers={**JSON, "X-API-Key": key,
                                                                   "X-Request-Id": rid}) as r:
        doc = await r.json()
        if r.status != 200:
            return r.status, None
        (out,) = [o for o in doc["outputs"] if o["name"] == "predict_proba"]
        return r.status, np.asarray(out["data"], dtype=np.float64).reshape(rows.shape[0], -1)


def _is_hardened(proba: np.ndarray) -> bool:
    """The default hardening: only the top class keeps a probability, rounded to one digit."""
    return bool(np.all(np.count_nonzero(proba, axis=1) <= 1) and np.allclose(proba, np.round(proba, 1)))


class TestNaturalDataCrawl:
    async def test_thief_hardened_before_blocked_batch_client_not(self, mlserver: ModelServer, start_guard,
                                                                  digits_profile: str, digits: DigitsData) -> None:
        """A thief sending 16-row requests of noisy held-out digits is hardened by `natural-data-crawl` before
        any block, and every answer after that is hardened; a batch client with 8 x 64 held-out rows is not."""
        guard = await start_guard(mlserver.url, profile=digits_profile)  # the default policy
        rng = np.random.default_rng(5)
        spread = digits.X_train.std(axis=0)
        statuses: list[int] = []
        hardened: list[bool] = []
        async with aiohttp.ClientSession() as http:
            for i in range(125):  # 2,000 rows
                base = digits.X_test[rng.integers(len(digits.X_test), size=16)]
                rows = np.clip(base + rng.normal(0.0, 0.05, base.shape) * spread, 0, 16)
                status, proba = await infer(http, guard.url, rows, "thief", f"thief-{i}")
                statuses.append(status)
                hardened.append(proba is not None and _is_hardened(proba))
                if status == 403:
                    break
        first = hardened.index(True)
        (event,) = guard.events_for(f"thief-{first}")
        assert event["event"]["action"] == "harden"
        assert event["rule"]["name"] == "natural-data-crawl"
        assert event["guard"]["scores"]["session.crawl"] >= 0.5
        assert 40 <= first <= 100  # about 1,000 distinct rows: far beyond a benign client's volume
        assert 403 not in statuses[: first + 1]
        answered_after = [h for s, h in zip(statuses[first:], hardened[first:], strict=True) if s == 200]
        assert answered_after and all(answered_after)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))) as http:
            batch = [await infer(http, guard.url, digits.X_test[rng.integers(len(digits.X_test), size=64)],
                                 "batch-client", f"batch-{i}") for i in range(8)]
        assert [s for s, _ in batch] == [200] * 8
        assert not any(_is_hardened(p) for _, p in batch if p is not None)
        assert all(e["event"]["action"] == "allow" for i in range(8) for e in guard.events_for(f"batch-{i}"))
