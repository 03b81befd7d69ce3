"""The self-test's checks: one bounded attack (or benign stream) per defence, each under its own session.

- benign traffic allowed: held-out reference rows at a human pace must be answered.
- OOD inputs refused: far out-of-range rows must be refused or answered with a hardened (top-1 / label-only)
  answer; uniform noise over the reference range is sent too and counted, but may only be flagged.
- black-box evasion blocked: HopSkipJump (ART, the ``[attack]`` extra) against the guarded model must be
  stopped (403) within its query budget.
- model extraction blocked: Jacobian-based dataset augmentation (a few natural seeds, then synthetic points
  stepped along a substitute's gradient) must be stopped (403) within its budget.

The attacks are the attack benchmark's (``guard_agent.attacks``), run through its client with pacing and a
shared request budget added (``PacedGuardClient``). Sessions are API keys in ``X-API-Key``.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from guard_agent.selftest._client import Answer, Budget, BudgetExhausted, InferenceClient, PacedGuardClient

__all__ = ["CheckResult", "SelftestConfig", "run_checks"]


@dataclass(frozen=True)
class SelftestConfig:
    target: str
    model: str
    data: np.ndarray                      # reference rows (benign inputs for this model)
    max_requests: int = 400
    time_limit: float = 120.0
    rate: float = 20.0                    # requests per second per check (stay under the policy's rate limit)
    benign_requests: int = 20
    ood_requests: int = 10
    seed: int = 0


@dataclass(frozen=True)
class CheckResult:
    defence: str
    passed: bool
    requests: int
    refused: int
    detail: str
    request_ids: tuple[str, ...] = ()


def _benign(cfg: SelftestConfig, budget: Budget,
            rng: np.random.Generator) -> tuple[CheckResult, tuple[np.ndarray, np.ndarray]]:
    """The check, and the answered rows with the model's labels (the extraction check measures its thief on
    them)."""
    client = InferenceClient(cfg.target, cfg.model, budget=budget, rate=min(cfg.rate, 10.0), label="selftest-benign")
    rows = cfg.data[rng.choice(len(cfg.data), size=min(cfg.benign_requests, len(cfg.data)), replace=False)]
    answers = [client.send(x) for x in rows]
    ok = sum(a.status == 200 for a in answers)
    refused = [a for a in answers if a.status != 200]
    passed = ok >= int(np.ceil(0.95 * len(answers)))
    detail = f"{ok}/{len(answers)} answered"
    if refused:
        detail += f"; refused: {', '.join(f'{a.request_id} ({a.status})' for a in refused[:3])}"
    answered = [(x, int(np.argmax(a.scores[0]))) for x, a in zip(rows, answers, strict=True)
                if a.status == 200 and a.scores is not None]
    reference = (np.array([x for x, _ in answered]).reshape(len(answered), -1),
                 np.array([y for _, y in answered], dtype=np.int64))
    return CheckResult("benign traffic allowed", passed, len(answers), len(refused), detail,
                       tuple(a.request_id for a in refused)), reference


def _degraded(answer: Answer) -> bool:
    """A 200 whose scores carry at most one non-zero class per row (top-1 or label-only hardening)."""
    if answer.status != 200 or answer.scores is None or answer.scores.ndim != 2 or answer.scores.shape[1] < 2:
        return False
    return bool(((answer.scores > 0).sum(axis=1) <= 1).all())


def _ood(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator) -> CheckResult:
    client = InferenceClient(cfg.target, cfg.model, budget=budget, rate=cfg.rate, label="selftest-ood")
    lo, hi = cfg.data.min(axis=0), cfg.data.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    answers = []
    for i in range(cfg.ood_requests):
        # even: noise over the reference range; odd: far outside every reference value
        x = rng.uniform(lo, hi) if i % 2 == 0 else hi + span * rng.uniform(5, 20, size=lo.shape)
        answers.append(client.send(x))
    # refused, or answered with a hardened (top-1 / label-only) answer: the default policy hardens far-OOD
    # rows instead of blocking them, since legitimate distribution shift lands there too
    refused = [a for a in answers if a.refused or _degraded(a)]
    # far-out rows must all be stopped; noise inside every feature's range may only be flagged (a client cannot
    # see a flag; the session trackers stop a client that keeps sending it)
    far = answers[1::2]
    passed = all(a.refused or _degraded(a) for a in far)
    allowed = [a.request_id for a in answers if not (a.refused or _degraded(a))]
    detail = f"{len(refused)}/{len(answers)} refused or hardened"
    if allowed:
        detail += (f"; answered: {', '.join(allowed[:3])} (a 'flag' decision answers the client: "
                   "look these request ids up in the decision events)")
    return CheckResult("OOD inputs refused", passed, len(answers), len(refused), detail, tuple(allowed))


def _n_classes(cfg: SelftestConfig, budget: Budget) -> int:
    probe = InferenceClient(cfg.target, cfg.model, budget=budget, label="selftest-probe")
    answer = probe.send(cfg.data[0])
    if answer.scores is None:
        raise RuntimeError(f"the model did not answer a reference row (status {answer.status}); "
                           "check --target, --model and --data")
    return max(2, int(answer.scores.shape[1]))


def _attacker(cfg: SelftestConfig, budget: Budget, name: str) -> PacedGuardClient:
    return PacedGuardClient(url=cfg.target, keys=[f"selftest-{name}-{secrets.token_hex(8)}"],
                            run_id=f"selftest-{name}-{secrets.token_hex(3)}", model=cfg.model,
                            interval=1.0 / cfg.rate, budget=budget)


def _verdict(defence: str, client: PacedGuardClient, method: str, stopped: bool, extra: str = "") -> CheckResult:
    """PASS only when a 403 stopped the attack: a 429 is the rate limit, not the defence under test."""
    refused = sum(client.refused.values())
    last = f"{client.run_id}-{client.sent - 1}"
    if stopped and client.refused.get(403):
        return CheckResult(defence, True, client.sent, refused,
                           f"{method}: refused (403) after {client.sent} queries{extra}", (last,))
    if stopped:
        return CheckResult(defence, False, client.sent, refused,
                           f"{method}: stopped by {sorted(client.refused)} after {client.sent} queries, not by a "
                           f"detector (403): lower --rate below the policy's rate limit{extra}", (last,))
    return CheckResult(defence, False, client.sent, refused,
                       f"{method}: {client.answered} of {client.sent} queries answered, never refused{extra}")


def _evasion(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator, n_classes: int,
             share: int) -> CheckResult:
    """HopSkipJump through the guard, at most ``share`` queries, started from a natural input of another class.

    ``guard_agent.attacks.black_box_evasion`` starts HopSkipJump from uniform noise, which the OOD detectors
    stop within a few queries; starting from a natural input keeps every query near the data, so what is
    tested here is the session trackers, the defence meant for this attack.
    """
    defence = "black-box evasion blocked"
    try:
        with warnings.catch_warnings():  # ART warns about optional deep-learning back ends it does not need
            warnings.simplefilter("ignore")
            from art.attacks.evasion import HopSkipJump
            from art.estimators.classification import BlackBoxClassifier
    except ImportError:
        return CheckResult(defence, False, 0, 0, "ART is not installed: pip install 'inference-guard[attack]'")
    from guard_agent.attacks import AttackBlocked

    client = _attacker(cfg, Budget(share, budget.deadline), "evasion")
    x0 = cfg.data[rng.integers(len(cfg.data))]
    lo, hi = float(cfg.data.min()), float(cfg.data.max())
    best = start_l2 = float("inf")
    stopped = False

    def predict(X: np.ndarray) -> np.ndarray:
        nonlocal best
        rows = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        labels = client.predict(rows).labels
        adv = labels != y0
        if adv.any():
            best = min(best, float(np.min(np.linalg.norm(rows[adv] - x0, axis=1))))
        onehot: np.ndarray = np.eye(n_classes)[np.clip(labels, 0, n_classes - 1)]
        return onehot

    try:
        y0 = int(client.predict(x0[None, :]).labels[0])
        start = next((x for x in cfg.data[rng.permutation(len(cfg.data))[:20]]
                      if int(client.predict(x[None, :]).labels[0]) != y0), None)
        if start is not None:
            start_l2 = float(np.linalg.norm(start - x0))
            clf = BlackBoxClassifier(predict, input_shape=x0.shape, nb_classes=n_classes, clip_values=(lo, hi))
            attack = HopSkipJump(clf, targeted=False, max_iter=max(1, share // 100), max_eval=100, init_eval=20,
                                 init_size=20, verbose=False)
            np.random.seed(cfg.seed)  # ART draws from numpy's global generator: repeatable runs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attack.generate(x=x0[None, :], x_adv_init=start[None, :])
    except AttackBlocked:
        stopped = True
    except BudgetExhausted:
        pass
    finally:
        budget.used += client.sent
        client.close()
    found = (f"; closest adversarial answered at L2 {best:.3g} (the natural start: {start_l2:.3g})"
             if np.isfinite(best) and np.isfinite(start_l2) else "")
    return _verdict(defence, client, "HopSkipJump (ART)", stopped, found)


def _extraction(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator, n_classes: int, share: int,
                reference: tuple[np.ndarray, np.ndarray]) -> CheckResult:
    """Jacobian-based dataset augmentation (``guard_agent.attacks.extraction_attack``), ``share`` queries."""
    from guard_agent.attacks import extraction_attack

    client = _attacker(cfg, Budget(share, budget.deadline), "extraction")
    seeds = cfg.data[rng.choice(len(cfg.data), size=min(10, len(cfg.data)), replace=False)]
    X_eval, y_victim = reference
    try:
        result = extraction_attack(client, "jbda", n_queries=share, pool=seeds, X_eval=X_eval, y_victim=y_victim,
                                   goal_fidelity=0.9, n_classes=n_classes,
                                   clip=(float(cfg.data.min()), float(cfg.data.max())), seed=cfg.seed)
        stopped, fid = result.stopped, result.detail.get("fidelity")
    except BudgetExhausted:
        stopped, fid = False, None
    finally:
        budget.used += client.sent
        client.close()
    extra = f"; stolen-model agreement {fid:.0%} on the benign rows" if fid is not None and len(y_victim) else ""
    return _verdict("model extraction blocked", client, "Jacobian augmentation", stopped, extra)


def run_checks(cfg: SelftestConfig, *, progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """All four checks in order (benign first, before any attack session exists), within the budgets."""
    rng = np.random.default_rng(cfg.seed)
    budget = Budget(cfg.max_requests, time.monotonic() + cfg.time_limit)
    say = progress or (lambda _m: None)
    n_classes = _n_classes(cfg, budget)
    results = []
    say("benign traffic ...")
    benign, reference = _benign(cfg, budget, rng)
    results.append(benign)
    say("out-of-distribution inputs ...")
    results.append(_ood(cfg, budget, rng))
    remaining = max(0, cfg.max_requests - budget.used)
    say("black-box evasion ...")
    results.append(_evasion(cfg, budget, rng, n_classes, share=remaining // 2))
    say("model extraction ...")
    results.append(_extraction(cfg, budget, rng, n_classes, share=max(0, cfg.max_requests - budget.used),
                               reference=reference))
    return results
