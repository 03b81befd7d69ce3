"""The self-test's checks: one bounded attack (or benign stream) per defence, each under its own session.

- benign traffic allowed: held-out reference rows at a human pace must be answered.
- OOD inputs refused: uniform noise over the reference range and far out-of-range rows must be refused.
- black-box evasion blocked: HopSkipJump (ART, the ``[attack]`` extra) against the guarded model must be
  stopped (403) within its query budget; without ART a boundary-walking loop of the same query pattern
  (near-duplicates around one input) stands in.
- model extraction blocked: Jacobian-based dataset augmentation (a few natural seeds, then synthetic points
  stepped along a surrogate's gradient) must be stopped within its budget.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from guard_agent.selftest._client import Answer, Budget, BudgetExhausted, InferenceClient

__all__ = ["CheckResult", "Refused", "SelftestConfig", "run_checks"]


@dataclass(frozen=True)
class SelftestConfig:
    target: str
    model: str
    data: np.ndarray                      # reference rows (benign inputs for this model)
    protocol: str = "v2"
    session_header: str = "X-API-Key"
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


class Refused(Exception):
    """The guard refused the attacker: the attack loop stops here."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"refused with {answer.status}")
        self.answer = answer


def _benign(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator) -> CheckResult:
    client = InferenceClient(cfg.target, cfg.model, budget=budget, protocol=cfg.protocol,
                             session_header=cfg.session_header, rate=min(cfg.rate, 10.0), label="selftest-benign")
    rows = cfg.data[rng.choice(len(cfg.data), size=min(cfg.benign_requests, len(cfg.data)), replace=False)]
    answers = [client.send(x) for x in rows]
    ok = sum(a.status == 200 for a in answers)
    refused = [a for a in answers if a.status != 200]
    passed = ok >= int(np.ceil(0.95 * len(answers)))
    detail = f"{ok}/{len(answers)} answered"
    if refused:
        detail += f"; refused: {', '.join(f'{a.request_id} ({a.status})' for a in refused[:3])}"
    return CheckResult("benign traffic allowed", passed, len(answers), len(refused), detail,
                       tuple(a.request_id for a in refused))


def _ood(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator) -> CheckResult:
    client = InferenceClient(cfg.target, cfg.model, budget=budget, protocol=cfg.protocol,
                             session_header=cfg.session_header, rate=cfg.rate, label="selftest-ood")
    lo, hi = cfg.data.min(axis=0), cfg.data.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    answers = []
    for i in range(cfg.ood_requests):
        # even: noise over the reference range; odd: far outside every reference value
        x = rng.uniform(lo, hi) if i % 2 == 0 else hi + span * rng.uniform(5, 20, size=lo.shape)
        answers.append(client.send(x))
    refused = [a for a in answers if a.refused]
    passed = len(refused) >= 0.8 * len(answers)  # mild noise may only be flagged, which a client cannot see
    allowed = [a.request_id for a in answers if not a.refused]
    detail = f"{len(refused)}/{len(answers)} refused"
    if allowed:
        detail += (f"; answered: {', '.join(allowed[:3])} (a 'flag' decision answers the client: "
                   "look these request ids up in the decision events)")
    return CheckResult("OOD inputs refused", passed, len(answers), len(refused), detail, tuple(allowed))


def _predict_fn(client: InferenceClient, n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """What an attack library sees: labels as one-hot rows, one request per row; stops on refusal."""

    def predict(X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), n_classes))
        for i, row in enumerate(np.asarray(X, dtype=np.float64).reshape(len(X), -1)):
            answer = client.send(row)
            if answer.refused:
                raise Refused(answer)
            if answer.scores is None:
                raise RuntimeError(f"unexpected answer {answer.status} from the guard")
            scores = answer.scores[0]
            out[i, int(np.argmax(scores)) if scores.size > 1 else int(scores[0])] = 1.0
        return out

    return predict


def _n_classes(cfg: SelftestConfig, budget: Budget) -> int:
    probe = InferenceClient(cfg.target, cfg.model, budget=budget, protocol=cfg.protocol,
                            session_header=cfg.session_header, label="selftest-probe")
    answer = probe.send(cfg.data[0])
    if answer.scores is None:
        raise RuntimeError(f"the model did not answer a reference row (status {answer.status}); "
                           "check --model, --protocol and --data")
    return max(2, int(answer.scores.shape[1]))


def _evasion(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator, n_classes: int,
             share: int) -> CheckResult:
    client = InferenceClient(cfg.target, cfg.model, budget=Budget(share, budget.deadline), protocol=cfg.protocol,
                             session_header=cfg.session_header, rate=cfg.rate, label="selftest-evasion")
    predict = _predict_fn(client, n_classes)
    x0 = cfg.data[rng.integers(len(cfg.data))]
    lo, hi = float(cfg.data.min()), float(cfg.data.max())
    method = "HopSkipJump (ART)"
    found = False
    try:
        try:
            with warnings.catch_warnings():  # ART warns about optional deep-learning back ends it does not need here
                warnings.simplefilter("ignore")
                from art.attacks.evasion import HopSkipJump
                from art.estimators.classification import BlackBoxClassifier
        except ImportError:
            method = "boundary walk (ART not installed)"
            found = _boundary_walk(predict, x0, cfg.data, rng)
        else:
            clf = BlackBoxClassifier(predict, input_shape=x0.shape, nb_classes=n_classes, clip_values=(lo, hi))
            attack = HopSkipJump(clf, targeted=False, max_iter=10, max_eval=200, init_eval=20, init_size=50,
                                 verbose=False)
            start = _other_class(predict, x0, cfg.data, rng)  # a natural input of another class, not noise
            if start is None:
                raise RuntimeError("no reference row of another class found for the evasion start")
            np.random.seed(cfg.seed)  # ART draws from the global RNG: repeatable runs
            adv = attack.generate(x=x0[None, :], x_adv_init=start[None, :])
            found = bool(np.argmax(predict(adv)) != np.argmax(predict(x0[None, :])))
    except Refused as exc:
        budget.used += client.sent
        return CheckResult("black-box evasion blocked", True, client.sent, 1,
                           f"{method}: refused ({exc.answer.status}) after {client.sent} queries",
                           (exc.answer.request_id,))
    except BudgetExhausted as exc:
        budget.used += client.sent
        return CheckResult("black-box evasion blocked", False, client.sent, 0,
                           f"{method}: not refused within {client.sent} queries ({exc})")
    budget.used += client.sent
    outcome = "found an adversarial example" if found else "finished"
    return CheckResult("black-box evasion blocked", False, client.sent, 0,
                       f"{method}: {outcome} after {client.sent} queries without being refused")


def _other_class(predict: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, data: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray | None:
    y0 = int(np.argmax(predict(x0[None, :])))
    for x in data[rng.permutation(len(data))[:10]]:
        if int(np.argmax(predict(x[None, :]))) != y0:
            return np.asarray(x, dtype=np.float64)
    return None


def _boundary_walk(predict: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, data: np.ndarray,
                   rng: np.random.Generator) -> bool:
    """A decision-based attack without ART: binary search to the boundary, then small random steps along it."""
    y0 = int(np.argmax(predict(x0[None, :])))
    far = _other_class(predict, x0, data, rng)
    if far is None:
        return False
    a, b = 0.0, 1.0
    for _ in range(10):
        mid = (a + b) / 2
        if int(np.argmax(predict(((1 - mid) * x0 + mid * far)[None, :]))) != y0:
            b = mid
        else:
            a = mid
    best = (1 - b) * x0 + b * far
    scale = float(np.std(data)) * 0.05
    while True:  # until refused or the budget runs out
        step = best + rng.normal(0, scale, size=best.shape)
        towards = step + 0.05 * (x0 - step)
        if int(np.argmax(predict(towards[None, :]))) != y0:
            best = towards


def _extraction(cfg: SelftestConfig, budget: Budget, rng: np.random.Generator, n_classes: int,
                share: int) -> CheckResult:
    """Jacobian-based dataset augmentation (Papernot et al.): a few natural seeds, then synthetic points
    stepped along the gradient of a surrogate trained on the answers, doubling every round."""
    from sklearn.linear_model import LogisticRegression

    client = InferenceClient(cfg.target, cfg.model, budget=Budget(share, budget.deadline), protocol=cfg.protocol,
                             session_header=cfg.session_header, rate=cfg.rate, label="selftest-extraction")
    predict = _predict_fn(client, n_classes)
    lo, hi = cfg.data.min(axis=0), cfg.data.max(axis=0)
    step = 0.1 * np.maximum(hi - lo, 0.0)
    queried = cfg.data[rng.choice(len(cfg.data), size=min(10, len(cfg.data)), replace=False)]
    labels = np.empty(0, dtype=int)
    new = queried
    try:
        for round_ in range(12):
            labels = np.r_[labels, np.argmax(predict(new), axis=1)]
            surrogate = LogisticRegression(max_iter=500).fit(queried, labels) if len(set(labels)) > 1 else None
            if surrogate is None:
                grads = rng.normal(size=queried.shape)
            else:
                index = {c: i for i, c in enumerate(surrogate.classes_)}
                coef = surrogate.coef_ if len(surrogate.classes_) > 2 else np.r_[-surrogate.coef_, surrogate.coef_]
                grads = np.stack([coef[index[y]] for y in labels])
            sign = 1.0 if round_ % 2 == 0 else -1.0  # Papernot's periodic step sign
            new = np.clip(queried + sign * step * np.sign(grads), lo, hi)
            queried = np.r_[queried, new]
    except Refused as exc:
        budget.used += client.sent
        return CheckResult("model extraction blocked", True, client.sent, 1,
                           f"Jacobian augmentation refused ({exc.answer.status}) after {client.sent} queries",
                           (exc.answer.request_id,))
    except BudgetExhausted as exc:
        budget.used += client.sent
        return CheckResult("model extraction blocked", False, client.sent, 0,
                           f"not refused within {client.sent} Jacobian-augmentation queries ({exc})")
    budget.used += client.sent
    return CheckResult("model extraction blocked", False, client.sent, 0,
                       f"{len(queried)} queries answered without being refused")


def run_checks(cfg: SelftestConfig, *, progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """All four checks in order (benign first, before any attack session exists), within the budgets."""
    rng = np.random.default_rng(cfg.seed)
    budget = Budget(cfg.max_requests, time.monotonic() + cfg.time_limit)
    say = progress or (lambda _m: None)
    n_classes = _n_classes(cfg, budget)
    results = []
    say("benign traffic ...")
    results.append(_benign(cfg, budget, rng))
    say("out-of-distribution inputs ...")
    results.append(_ood(cfg, budget, rng))
    remaining = max(0, cfg.max_requests - budget.used)
    say("black-box evasion ...")
    results.append(_evasion(cfg, budget, rng, n_classes, share=remaining // 2))
    say("model extraction ...")
    results.append(_extraction(cfg, budget, rng, n_classes, share=max(0, cfg.max_requests - budget.used)))
    return results
