"""A text classifier behind the guard: a real MLServer (sklearn runtime) serving TF-IDF + logistic regression
trained here on the fortunes corpus, the guard in front with a text profile, and real attacks through it."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from guard_agent.attacks import REFUSED, TextClient, char_swap, fortune_texts, text_body, text_classifier
from tests._support.servers import free_port
from tests.conftest import wait_http
from tests.text.conftest import TextData, stop

pytestmark = pytest.mark.slow

MODEL = "fortunes"
INFER = f"/v2/models/{MODEL}/infer"
JSON = {"Content-Type": "application/json"}


class TextServer:
    def __init__(self, url: str, clf: Any) -> None:
        self.url = url
        self.clf = clf


@pytest.fixture(scope="module")
def text_mlserver(tmp_path_factory: pytest.TempPathFactory, fortunes: TextData) -> Iterator[TextServer]:
    """MLServer 1.7.1 (mlserver-sklearn) serving the TF-IDF + LogisticRegression pipeline on a free port."""
    import joblib  # MLServer's own model format; only the test writes it, the guard never loads it

    root = tmp_path_factory.mktemp("text-mlserver")
    port = free_port()
    clf = text_classifier(fortunes.train, fortunes.y_train.tolist())
    (root / MODEL).mkdir()
    joblib.dump(clf, root / MODEL / "model.joblib")
    (root / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0}))
    exe = str(Path(sys.executable).parent / "mlserver")
    with open(root / "mlserver.log", "wb") as log:
        proc = subprocess.Popen([exe, "start", str(root)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "MLSERVER_LOGGING": "WARNING"})
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", timeout=120, proc=proc)
        yield TextServer(f"http://127.0.0.1:{port}", clf)
    finally:
        stop(proc)


@pytest.fixture
async def text_guard(start_guard: Any, text_mlserver: TextServer, text_profile_dir: Path) -> Any:
    return await start_guard(text_mlserver.url, profile=str(text_profile_dir))


async def post(url: str, body: bytes, request_id: str, key: str = "k", **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            url + INFER, data=body, headers={**JSON, "X-Request-Id": request_id, "X-API-Key": key, **headers}) as r:
        return r.status, await r.json(content_type=None)


class TestTextClassifier:
    async def test_benign_text_scored_and_forwarded(self, text_guard: Any, text_mlserver: TextServer,
                                                    fortunes: TextData) -> None:
        """A benign text request reaches MLServer and comes back unchanged; its one event carries the text
        projection's detector scores and the four text checks, never the text itself."""
        texts = fortunes.test[:2]
        status, doc = await post(text_guard.url, text_body(texts), "text-ok")
        assert status == 200
        proba = np.asarray(doc["outputs"][0]["data"]).reshape(2, -1)
        assert np.allclose(proba, text_mlserver.clf.predict_proba(texts))
        (event,) = text_guard.events_for("text-ok")
        assert event["event"]["action"] == "allow"
        scores = event["guard"]["scores"]
        assert {"ood.combined", "text.invisible", "text.control", "text.confusable", "text.length"} <= set(scores)
        assert event["guard"]["features"] == 35
        assert texts[0][:20] not in json.dumps(event)

    async def test_invisible_characters_flagged(self, text_guard: Any) -> None:
        """Zero-width characters (never in the reference) score near 1 and the default policy flags them."""
        status, _ = await post(text_guard.url, text_body(["free\u200b money\u200b now"]), "text-zw")
        assert status == 200
        (event,) = text_guard.events_for("text-zw")
        assert event["guard"]["scores"]["text.invisible"] > 0.999
        assert event["event"]["action"] == "flag"
        assert event["rule"]["name"] == "text-invisible-characters"

    async def test_not_utf8_refused(self, text_guard: Any) -> None:
        """Binary BYTES that are not UTF-8 get a 400 naming the encoding, and exactly one reject event."""
        raw = struct.pack("<I", 4) + "caf\u00e9".encode("latin-1")
        header = orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                           "parameters": {"binary_data_size": len(raw)}}]})
        status, doc = await post(text_guard.url, header + raw, "text-latin1",
                                 **{"Inference-Header-Content-Length": str(len(header))})
        assert status == 400
        assert "UTF-8" in doc["error"]["message"]
        (event,) = text_guard.events_for("text-latin1")
        assert event["event"]["action"] == "reject"

    async def test_char_swap_attack_stopped(self, text_guard: Any, text_mlserver: TextServer,
                                            fortunes: TextData) -> None:
        """A character-edit attack (DeepWordBug family) through the guard: its near-duplicate queries get the
        session blocked, and it evades on fewer texts than against the bare model."""
        predicted = text_mlserver.clf.predict(fortunes.test[:200])
        targets = [t for t, y, p in zip(fortunes.test[:200], fortunes.y_test[:200], predicted, strict=True)
                   if y == p and 15 < len(t.split()) < 40][:3]

        def attack(url: str) -> Any:
            client = TextClient(url, ["attacker-key"], f"swap-{url[-5:]}", model=MODEL)
            try:
                return char_swap(client, targets, budget=150)
            finally:
                client.close()

        bare = await asyncio.to_thread(attack, text_mlserver.url)
        guarded = await asyncio.to_thread(attack, text_guard.url)
        assert bare.detail["evaded"] >= 1
        assert guarded.stopped
        assert guarded.detail["evaded"] < bare.detail["evaded"]
        rules = {e["rule"]["name"] for e in text_guard.events if e.get("event", {}).get("action") == "block"}
        assert rules & {"black-box-attack", "session-attack", "model-extraction"}

    async def test_benign_session_not_blocked(self, text_guard: Any, fortunes: TextData) -> None:
        """Forty held-out texts from one key, with a few exact retries, are all answered."""
        texts = fortunes.test[200:236] + fortunes.test[200:204]

        def run() -> Any:
            client = TextClient(text_guard.url, ["benign-key"], "benign", model=MODEL, refusals_to_retire=10**6)
            try:
                return client.predict_texts(texts)
            finally:
                client.close()

        answer = await asyncio.to_thread(run)
        assert (answer.labels != REFUSED).all()


def test_other_corpus_available() -> None:
    """The extraction attack's corpus (fortunes-bofh-excuses) is installed."""
    assert len(fortune_texts("bofh-excuses")) > 400


async def test_text_to_numeric_profile_refused(start_guard: Any, text_mlserver: TextServer, tmp_path: Path) -> None:
    """Text sent to a model whose profile was fitted on numbers gets a 400 that says so, and is not forwarded."""
    from detectors import fit_profile, save_profile

    X = np.random.default_rng(0).normal(size=(200, 4))
    save_profile(fit_profile(X, seed=0), tmp_path / "numeric")
    guard = await start_guard(text_mlserver.url, profile=str(tmp_path / "numeric"))
    status, doc = await post(guard.url, text_body(["hello"]), "text-numeric")
    assert status == 400
    assert "fitted on numbers" in doc["error"]["message"]
