"""bench/detection_matrix.py: the quick matrix blocks no benign session, and its in-process decision path
decides like the real guard over HTTP in front of a real MLServer."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from tests._support.waiting import wait_for
from tests.conftest import DigitsData, GuardFactory, ModelServer, v2_body
from tests.trackers.streams import hsj_like

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)  # the whole matrix in a subprocess: minutes on a loaded 2-core machine
def test_quick_matrix_blocks_no_benign_session() -> None:
    """``detection_matrix.py --quick`` (five models, six benign shapes, a few attacks) exits 0: no benign
    session was blocked; the tables are printed."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "detection_matrix.py"), "--quick", "--attacks",
                           "hsj", "hsj-10-keys", "uniform"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| digits-mlp | all | 60 |" in done.stdout and "| wine-rf | hsj | 1 |" in done.stdout


def _mlserver_proba(url: str, rows: np.ndarray) -> np.ndarray:
    """MLServer's predict_proba for ``rows`` (the in-process path asks the same model the guard forwards to)."""
    req = urllib.request.Request(url + "/v2/models/digits/infer", data=v2_body(rows),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        doc = orjson.loads(resp.read())
    out = next(o for o in doc["outputs"] if o["name"] == "predict_proba")
    return np.asarray(out["data"], dtype=np.float64).reshape(rows.shape[0], -1)


async def test_in_process_path_decides_as_the_real_guard(tmp_path: Path, mlserver: ModelServer, digits: DigitsData,
                                                         start_guard: GuardFactory) -> None:
    """The same queries (benign rows, then a boundary search from one key and its continuation from another)
    get the same decision from ``InProcessGuard`` and from the running guard over HTTP, request by request,
    with the default policy and a profile fitted the way the matrix fits it; the search is blocked."""
    from _matrix_guard import InProcessGuard
    from _matrix_models import MatrixModel, fit_guard_profile

    model = MatrixModel("digits", "", digits.X_train, digits.y_train, digits.X_test, digits.y_test, None,
                        (np.zeros(64), np.full(64, 16.0)))
    profile, _ = fit_guard_profile(model, tmp_path / "fit")
    labels = lambda rows: _mlserver_proba(mlserver.url, rows).argmax(axis=1)  # noqa: E731
    search = hsj_like(digits.X_test[3], np.random.default_rng(3), 40, hi=16.0, predict=labels)
    queries = [("benign", r) for r in digits.X_test[20:30]] + [("k1", r) for r in search[:30]]
    queries += [("k2", r) for r in search[30:]]
    local = InProcessGuard(str(profile), lambda rows: _mlserver_proba(mlserver.url, rows))
    # each client from its own address (through a trusted proxy), as the matrix models distinct clients: the guard
    # also tracks a key's client address, which would otherwise merge the three keys of this test into one
    guard = await start_guard(mlserver.url, profile=str(profile), trusted_proxies=("127.0.0.1/32",))
    address = {"benign": "10.0.0.1", "k1": "10.0.0.2", "k2": "10.0.0.3"}
    remote, inproc = [], []
    async with aiohttp.ClientSession() as http:
        for n, (key, row) in enumerate(queries):
            async with http.post(guard.url + "/v2/models/digits/infer", data=v2_body(row[None]),
                                 headers={"X-API-Key": key, "X-Request-Id": f"m{n}",
                                          "X-Forwarded-For": address[key],
                                          "Content-Type": "application/json"}) as r:
                await r.read()
            assert await wait_for(lambda n=n: bool(guard.events_for(f"m{n}")), 10)
            remote.append(guard.events_for(f"m{n}")[0]["event"]["action"])
            # its own event loop: in a thread, beside this test's
            inproc.append((await asyncio.to_thread(local.ask, key, row[None], 1000.0 + 0.01 * n)).action)
    local.close()
    assert inproc == remote
    assert "block" in remote[10:]
    assert "block" not in remote[:10]


def test_evasion_runs_attack_a_row_the_attack_can_start_from() -> None:
    """On ``cancer-svc`` all uniform noise gets class 0, so HopSkipJump from a class-0 row never starts: the run
    moves on to the first candidate row from which the bare-model attack reaches an adversarial example."""
    from _matrix_attacks import _attackable
    from _matrix_models import load_model

    model = load_model("cancer-svc")
    labels = model.clf.predict(model.X_test)
    class0, class1 = np.flatnonzero(labels == 0)[:2], np.flatnonzero(labels == 1)[:1]
    row, best = _attackable(model, "hsj", [int(class0[0]), int(class0[1]), int(class1[0])], 200)
    assert row == int(class1[0]) and math.isfinite(best)
