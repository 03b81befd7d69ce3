"""One real guard for the operator tests (status, explain, Prometheus), started once per session.

Every client has its own API key from the guard's key file (verified keys: each has its own session; all
clients share 127.0.0.1). A real Prometheus (when the ``prometheus`` package is installed) scrapes it from
before the first request; benign clients send held-out digits for a while and one attacker runs a real extraction attack
(JBDA from ``guard_agent.attacks``) in the middle, until the guard blocks it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from guard_agent.attacks import GuardClient, extraction_attack
from guard_agent.demo import DigitsModel
from tests._support.redis import RedisServer
from tests._support.servers import free_port
from tests.ops._guard import RunningGuard, fit_demo_profile, running_guard
from tests.ops._prometheus import JOB, PrometheusServer, prometheus_binary
from tests.ops.paths import RULES

BENIGN_KEYS = tuple(f"ops-benign-key-{k}-0123456789" for k in range(4))
ATTACKER_KEY = "ops-attacker-key-0123456789"
ROUNDS = 10


@dataclass
class Ops:
    guard: RunningGuard
    prometheus: PrometheusServer | None
    redis: RedisServer
    attack_sent: int
    attack_stopped: bool
    benign_sent: int
    benign_answered: int
    started: float
    ended: float


def drive(guard: RunningGuard) -> tuple[int, bool, int, int]:
    """Benign rounds a second apart; after the fifth, the attack runs until the guard blocks it, and the attacker
    keeps knocking (two requests a round) on the same key afterwards. Returns (attack requests sent, attack
    stopped, benign sent, benign answered)."""
    model = guard.model
    rng = np.random.default_rng(11)
    clients = [GuardClient(guard.url, keys=[key], run_id=f"benign{k}") for k, key in enumerate(BENIGN_KEYS)]
    retry = GuardClient(guard.url, keys=[ATTACKER_KEY], run_id="jbda-again", refusals_to_retire=10**6)
    attack_sent, stopped = 0, False
    for rnd in range(ROUNDS):
        for client in clients:
            client.predict(model.X_test[rng.choice(len(model.X_test), 5, replace=False)])
        if rnd == 4:
            attacker = GuardClient(guard.url, keys=[ATTACKER_KEY], run_id="jbda")
            y_victim = model.predict_proba(model.X_test).argmax(axis=1)
            result = extraction_attack(attacker, "jbda", n_queries=600, pool=model.X_test[:10],
                                       X_eval=model.X_test, y_victim=y_victim, goal_fidelity=0.95, n_classes=10,
                                       clip=(0.0, 16.0))
            attacker.close()
            attack_sent, stopped = result.sent, result.stopped
        elif rnd > 4:
            retry.predict(model.X_test[rng.choice(len(model.X_test), 2, replace=False)])
        time.sleep(1.0)
    for client in [*clients, retry]:
        client.close()
    return attack_sent + retry.sent, stopped, sum(c.sent for c in clients), sum(c.answered for c in clients)


@pytest.fixture(scope="session")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    root = tmp_path_factory.mktemp("ops")
    model = DigitsModel()
    profile = fit_demo_profile(model, root / "profile")
    redis = RedisServer(root)
    redis.start()
    admin_port = free_port()
    prometheus = None
    if prometheus_binary() is not None:
        prometheus = PrometheusServer(root / "prometheus", f"127.0.0.1:{admin_port}", [RULES])
        prometheus.start()
    try:
        # a generous Redis budget: on a loaded CI machine a 50 ms budget turns slow calls into fallbacks (and,
        # repeated, into "Redis down"), which is not what these tests are about (test_status stops Redis itself)
        with running_guard(root, model, profile, redis_url=redis.url + "?budget_ms=1000", admin_port=admin_port,
                           api_keys=(*BENIGN_KEYS, ATTACKER_KEY)) as guard:
            if prometheus is not None:  # scraping from before the first request, so rates show the traffic
                prometheus.wait_for(f'up{{job="{JOB}"}} == 1')
                time.sleep(2.0)
            started = time.time()
            attack_sent, stopped, benign_sent, benign_answered = drive(guard)
            time.sleep(0.5)  # the capture writer and the SIEM sink catch up
            yield Ops(guard, prometheus, redis, attack_sent, stopped, benign_sent, benign_answered, started,
                      time.time())
    finally:
        if prometheus is not None:
            prometheus.stop()
        redis.stop()
