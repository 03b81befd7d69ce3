"""Model extraction through the guard: ART CopycatCNN / KnockoffNets with a scikit-learn thief,
Jacobian-based augmentation (JBDA), uniform random queries and plain natural-data querying.

Whatever the method, the thief's quality is measured the same way: a logistic regression trained on
the (row, answered label) pairs the attacker actually obtained, scored by its agreement with the
victim's labels on evaluation data (fidelity). Success = fidelity >= ``goal_fidelity``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from ._art import black_box_classifier, sklearn_thief
from ._client import REFUSED, AttackBlocked, GuardClient
from ._result import AttackResult

__all__ = ["Extraction", "extraction_attack", "fidelity"]

Extraction = Literal["copycat", "knockoff", "jbda", "uniform", "natural"]


def fidelity(rows: np.ndarray, labels: np.ndarray, X_eval: np.ndarray, y_victim: np.ndarray) -> float:
    """Agreement of a thief trained on (rows, labels) with the victim on X_eval (0 if untrainable)."""
    from sklearn.linear_model import LogisticRegression

    if rows.shape[0] < 2 or np.unique(labels).size < 2:
        return float(np.mean(y_victim == labels[0])) if labels.size else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a thief that has not fully converged is still a thief
        thief = LogisticRegression(max_iter=200).fit(rows, labels)
    return float(np.mean(thief.predict(X_eval) == y_victim))


def extraction_attack(
    client: GuardClient,
    method: Extraction,
    *,
    n_queries: int,
    pool: np.ndarray | None,
    X_eval: np.ndarray,
    y_victim: np.ndarray,
    goal_fidelity: float,
    n_classes: int,
    clip: tuple[float, float],
    seed: int = 0,
) -> AttackResult:
    """Run one extraction attack of at most ``n_queries`` queries. ``pool`` is the attacker's own
    unlabeled data (natural-data methods) or seed images (jbda); uniform ignores it."""
    rng = np.random.default_rng(seed)
    d = X_eval.shape[1]
    stopped = False
    try:
        if method in ("copycat", "knockoff"):
            _art_extraction(client, method, _need(pool)[:n_queries], n_classes, clip)
        elif method == "jbda":
            _jbda(client, _need(pool), n_queries, lam=0.1 * (clip[1] - clip[0]), clip=clip)
        elif method == "uniform":
            client.predict(rng.uniform(clip[0], clip[1], size=(n_queries, d)))
        else:
            client.predict(_need(pool)[:n_queries])
    except AttackBlocked:
        stopped = True
    rows = np.asarray(client.answered_rows).reshape(-1, d)
    labels = np.asarray(client.answered_labels, dtype=np.int64)
    fid = fidelity(rows, labels, X_eval, y_victim)
    return AttackResult(
        name=method, run_id=client.run_id, keys=len(client.keys), sent=client.sent, answered=client.answered,
        stopped=stopped, success=fid >= goal_fidelity, detail={"fidelity": fid, "goal_fidelity": goal_fidelity},
    )


def _need(pool: np.ndarray | None) -> np.ndarray:
    if pool is None or pool.shape[0] == 0:
        raise ValueError("this extraction method needs attacker data (pool)")
    return pool


def _art_extraction(client: GuardClient, method: str, x: np.ndarray, n_classes: int,
                    clip: tuple[float, float]) -> None:
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from sklearn.linear_model import LogisticRegression

    def predict(rows: np.ndarray) -> np.ndarray:
        labels = client.predict(np.asarray(rows, dtype=np.float64)).labels
        onehot: np.ndarray = np.eye(n_classes)[np.clip(labels, 0, n_classes - 1)]
        return onehot

    victim = black_box_classifier(predict, x.shape[1], n_classes, clip)
    thief = sklearn_thief(LogisticRegression(max_iter=200), clip)
    n = x.shape[0]
    if method == "copycat":
        attack = CopycatCNN(victim, batch_size_fit=n, batch_size_query=16, nb_epochs=1, nb_stolen=n)
    else:
        attack = KnockoffNets(victim, batch_size_fit=n, batch_size_query=16, nb_epochs=1, nb_stolen=n,
                              sampling_strategy="random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attack.extract(x.astype(np.float32), thieved_classifier=thief)


def _jbda(client: GuardClient, seeds: np.ndarray, n_queries: int, *, lam: float, clip: tuple[float, float]) -> None:
    """Papernot et al.: label the known points, fit a substitute, add x + lam * sign(grad) of the
    substitute's logit for the oracle's label, repeat until the query budget is spent."""
    from sklearn.linear_model import LogisticRegression

    pts = np.asarray(seeds, dtype=np.float64)[:n_queries]
    labels = client.predict(pts).labels
    spent = pts.shape[0]
    pts, labels = pts[labels != REFUSED], labels[labels != REFUSED]
    while spent < n_queries:
        if pts.shape[0] == 0:
            return
        if np.unique(labels).size < 2:
            grad = np.sign(np.random.default_rng(spent).normal(size=pts.shape))
        else:
            sub = LogisticRegression(max_iter=500).fit(pts, labels)
            idx = np.clip(np.searchsorted(sub.classes_, labels), 0, sub.coef_.shape[0] - 1)
            grad = np.sign(sub.coef_[idx]) if sub.coef_.shape[0] > 1 else np.sign(sub.coef_[[0] * len(pts)])
        new = np.clip(pts + lam * grad, clip[0], clip[1])[: n_queries - spent]
        new_labels = client.predict(new).labels
        ok = new_labels != REFUSED  # the attacker knows which queries were refused and drops them
        pts = np.concatenate([pts, new[ok]])
        labels = np.concatenate([labels, new_labels[ok]])
        spent += new.shape[0]
