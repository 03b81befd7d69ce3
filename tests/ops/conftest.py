"""One real guard for the operator tests (status, explain, Prometheus): started once, driven by benign
clients and a real extraction attack (JBDA from ``guard_agent.attacks``), kept running for the tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from guard_agent.attacks import GuardClient, extraction_attack
from guard_agent.demo import DigitsModel
from tests._support.redis import RedisServer
from tests.ops._guard import RunningGuard, fit_demo_profile, running_guard


@dataclass
class Traffic:
    guard: RunningGuard
    benign_keys: tuple[str, ...]
    attack_run: str
    attack_sent: int
    attack_stopped: bool
    benign_answered: int
    benign_sent: int


def drive(guard: RunningGuard) -> Traffic:
    """Benign clients send held-out digits; one attacker runs JBDA extraction until it is refused."""
    model = guard.model
    rng = np.random.default_rng(11)
    benign_keys = tuple(f"ops-benign-{k}" for k in range(4))
    answered = sent = 0
    for k, key in enumerate(benign_keys):
        client = GuardClient(guard.url, keys=[key], run_id=f"benign{k}")
        rows = model.X_test[rng.choice(len(model.X_test), 25, replace=False)]
        client.predict(rows)
        answered, sent = answered + client.answered, sent + client.sent
        client.close()
    attacker = GuardClient(guard.url, keys=["ops-attacker"], run_id="jbda")
    y_victim = model.predict_proba(model.X_test).argmax(axis=1)
    result = extraction_attack(attacker, "jbda", n_queries=600, pool=model.X_test[:10], X_eval=model.X_test,
                               y_victim=y_victim, goal_fidelity=0.95, n_classes=10, clip=(0.0, 16.0))
    attacker.close()
    return Traffic(guard, benign_keys, "jbda", result.sent, result.stopped, answered, sent)


@pytest.fixture(scope="session")
def ops_traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    root = tmp_path_factory.mktemp("ops")
    model = DigitsModel()
    profile = fit_demo_profile(model, root / "profile")
    redis = RedisServer(root)
    redis.start()
    try:
        with running_guard(root, model, profile, redis_url=redis.url) as guard:
            yield drive(guard)
    finally:
        redis.stop()
