"""guard_agent.attacks against a real HTTP model server on loopback (a small v2 server that can refuse)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from guard_agent.attacks import (
    REFUSED,
    AttackBlocked,
    GuardClient,
    black_box_evasion,
    extraction_attack,
    natural_patches,
)

from .conftest import Digits


class _Server:
    """OIP v2 digits model over HTTP that refuses a key (403) after ``allow`` requests from it."""

    def __init__(self, digits: Digits, allow: int, label_only: bool = False) -> None:
        self.digits, self.allow, self.label_only = digits, allow, label_only
        self.per_key: dict[str, int] = {}
        self.request_ids: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("X-API-Key", "")
                server.request_ids.append(self.headers.get("X-Request-Id", ""))
                server.per_key[key] = server.per_key.get(key, 0) + 1
                if server.per_key[key] > server.allow:
                    out, status = b'{"error": {"code": "blocked"}}', 403
                else:
                    t = body["inputs"][0]
                    X = np.asarray(t["data"], dtype=np.float64).reshape(t["shape"])
                    if server.label_only:
                        doc = {"outputs": [{"name": "predict", "shape": [len(X)], "datatype": "INT64",
                                            "data": server.digits.model.predict(X).tolist()}]}
                    else:
                        p = server.digits.model.predict_proba(X)
                        doc = {"outputs": [{"name": "predict_proba", "shape": list(p.shape), "datatype": "FP64",
                                            "data": p.ravel().tolist()}]}
                    out, status = json.dumps(doc).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory(digits: Digits) -> Iterator[object]:
    """Start servers on free loopback ports; stop them after the test."""
    started: list[_Server] = []

    def make(allow: int, label_only: bool = False) -> _Server:
        s = _Server(digits, allow, label_only)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


class TestGuardClient:
    def test_answers_and_request_ids(self, server_factory, digits: Digits) -> None:  # type: ignore[no-untyped-def]
        """Rows are answered with the model's labels and probabilities; request ids are run-id-index."""
        srv = server_factory(100)
        client = GuardClient(srv.url, ["k1"], "run7")
        ans = client.predict(digits.X_held[:5])
        client.close()
        assert np.array_equal(ans.labels, digits.model.predict(digits.X_held[:5]))
        assert ans.probabilities is not None and ans.probabilities.shape == (5, 10)
        assert srv.request_ids == [f"run7-{i}" for i in range(5)]
        assert client.sent == client.answered == 5

    def test_label_only_answers(self, server_factory, digits: Digits) -> None:  # type: ignore[no-untyped-def]
        """A hardened label-only answer still yields labels (and no probabilities)."""
        srv = server_factory(100, label_only=True)
        ans = GuardClient(srv.url, ["k"], "r").predict(digits.X_held[:3])
        assert ans.probabilities is None
        assert np.array_equal(ans.labels, digits.model.predict(digits.X_held[:3]))

    def test_refused_query_is_unusable_not_fatal(self, server_factory, digits: Digits) -> None:  # type: ignore[no-untyped-def]
        """A refused request gives REFUSED labels and no probabilities; the attack goes on."""
        srv = server_factory(3)
        client = GuardClient(srv.url, ["k"], "r")
        ans = client.predict(digits.X_held[:4])
        assert ans.labels[-1] == REFUSED and ans.probabilities is None
        assert np.array_equal(ans.labels[:3], digits.model.predict(digits.X_held[:3]))
        assert client.retired == []

    def test_refused_keys_are_retired_then_attack_stops(self, server_factory, digits: Digits) -> None:  # type: ignore[no-untyped-def]
        """A key refused refusals_to_retire times in a row is retired; with none left AttackBlocked is raised."""
        srv = server_factory(3)
        client = GuardClient(srv.url, ["a", "b"], "r", refusals_to_retire=3)
        with pytest.raises(AttackBlocked):
            client.predict(digits.X_held[:20])
        assert client.answered == 6
        assert client.retired == ["a", "b"]
        assert client.refused == {403: 6}

    def test_rejects_bad_setup(self) -> None:
        """No keys or a non-http URL are refused."""
        with pytest.raises(ValueError, match="key"):
            GuardClient("http://127.0.0.1:1", [], "r")
        with pytest.raises(ValueError, match="url"):
            GuardClient("ftp://x", ["k"], "r")


@pytest.mark.slow
class TestAttacks:
    def test_hsj_succeeds_unguarded_and_is_stopped_when_refused(self, server_factory, digits: Digits) -> None:  # type: ignore[no-untyped-def]
        """Unhindered, HopSkipJump finds an adversarial example; refused after 20 queries it stops and fails.

        The goal is a tenth of what 200 free queries reached: a run in CI once met half that distance by its
        sixth query."""
        free = server_factory(10**6)
        res = black_box_evasion(GuardClient(free.url, ["k"], "free"), digits.X_held[0], method="hsj",
                                goal_l2=1e9, n_classes=10, clip=(0.0, 16.0), budget=200)
        assert res.success and not res.stopped and np.isfinite(res.detail["best_l2"])
        strict = server_factory(20)
        res = black_box_evasion(GuardClient(strict.url, ["k"], "strict"), digits.X_held[0], method="hsj",
                                goal_l2=0.1 * res.detail["best_l2"], n_classes=10, clip=(0.0, 16.0), budget=200)
        assert res.stopped and not res.success and res.answered == 20

    @pytest.mark.parametrize("method", ["hsj", "boundary"])
    def test_one_seed_sends_the_same_queries(self, server_factory, digits: Digits, method: str) -> None:  # type: ignore[no-untyped-def]
        """Two runs of one seed send the same queries (ART alone draws its starting noise unseeded), and another
        seed others: the same count and best distance, a different distance for seed 1."""
        free = server_factory(10**6)
        runs = [black_box_evasion(GuardClient(free.url, ["k"], f"{method}{seed}-{n}"), digits.X_held[0],
                                  method=method, goal_l2=0.0, n_classes=10, clip=(0.0, 16.0), seed=seed, budget=60)
                for n, seed in enumerate([0, 0, 1])]
        assert runs[0].sent == runs[1].sent
        assert runs[0].detail["best_l2"] == runs[1].detail["best_l2"] < float("inf")
        assert runs[2].detail["best_l2"] != runs[0].detail["best_l2"]

    def test_no_adversarial_answer_is_no_success_whatever_the_goal(self, server_factory, digits: Digits) -> None:  # type: ignore[no-untyped-def]
        """Refused after its first query, the attack is answered no adversarial example: not a success, even
        against an infinite goal (the goal a baseline that found nothing gives)."""
        strict = server_factory(1)
        res = black_box_evasion(GuardClient(strict.url, ["k"], "none"), digits.X_held[0], method="hsj",
                                goal_l2=float("inf"), n_classes=10, clip=(0.0, 16.0), budget=200)
        assert res.detail["best_l2"] == float("inf") and not res.success

    @pytest.mark.parametrize("method", ["copycat", "knockoff", "natural", "jbda", "uniform"])
    def test_extraction_methods_run(self, server_factory, digits: Digits, method: str) -> None:  # type: ignore[no-untyped-def]
        """Each extraction method sends its queries and trains a thief; natural-data methods beat chance."""
        srv = server_factory(10**6)
        rng = np.random.default_rng(0)
        pool = digits.X_held[:10] if method == "jbda" else natural_patches(rng, 120)
        res = extraction_attack(GuardClient(srv.url, ["k"], method), method, n_queries=120, pool=pool,  # type: ignore[arg-type]
                                X_eval=digits.X_held, y_victim=digits.model.predict(digits.X_held),
                                goal_fidelity=0.99, n_classes=10, clip=(0.0, 16.0))
        assert res.answered == 120 and not res.stopped
        assert 0.0 <= res.detail["fidelity"] <= 1.0
        if method in ("copycat", "knockoff", "natural", "jbda"):
            assert res.detail["fidelity"] > 0.2
