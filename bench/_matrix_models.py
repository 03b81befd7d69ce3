"""The detection matrix's models: five kinds of input, each a scikit-learn model on data scikit-learn ships.

Every model is fitted on its training split; the guard's profile is fitted on the same split (the way
``guard-agent fit`` does it, by that command's own code); everything the matrix sends comes from the
held-out split, which neither saw. No constant here is chosen per dataset to please the guard: the
splits, model sizes and attack boxes follow one rule for all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MODELS", "MatrixModel", "fit_guard_profile", "load_model"]


@dataclass(frozen=True)
class MatrixModel:
    """One model of the matrix and its data. ``clip`` is the attack box, per feature (the training
    split's range; 0..16 for the images); ``integer`` marks coarse integer-valued inputs."""

    name: str
    kind: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    clf: Any
    clip: tuple[np.ndarray, np.ndarray]
    integer: bool = False

    @property
    def n_classes(self) -> int:
        return int(self.clf.predict_proba(self.X_test[:1]).shape[1])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.asarray(self.clf.predict_proba(np.asarray(X, dtype=np.float64)), dtype=np.float64)
        return out


def _split(X: np.ndarray, y: np.ndarray, test_size: float) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    parts: list[np.ndarray] = train_test_split(X.astype(np.float64), y, test_size=test_size, random_state=0,
                                               stratify=y)
    return tuple(parts)


def _box(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return X.min(axis=0).astype(np.float64), X.max(axis=0).astype(np.float64)


def _wine() -> MatrixModel:
    from sklearn.datasets import load_wine
    from sklearn.ensemble import RandomForestClassifier

    X, y = load_wine(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X, y, 0.3)  # 124 training rows
    clf = RandomForestClassifier(n_estimators=100, random_state=0).fit(Xtr, ytr)
    return MatrixModel("wine-rf", "small tabular (124 rows, 13 features, 3 classes)", Xtr, ytr, Xte, yte, clf,
                       _box(Xtr))


def _cancer() -> MatrixModel:
    from sklearn.datasets import load_breast_cancer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X, y, 0.3)
    clf = make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)).fit(Xtr, ytr)
    return MatrixModel("cancer-svc", "mid tabular (398 rows, 30 features, binary)", Xtr, ytr, Xte, yte, clf,
                       _box(Xtr))


def _coarse() -> MatrixModel:
    """Integer codes (ordinal levels and flags): many rows are exact repeats of one another."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import HistGradientBoostingClassifier

    X, y = make_classification(n_samples=3000, n_features=10, n_informative=5, n_redundant=2, n_classes=3,
                               n_clusters_per_class=1, random_state=0)
    levels = np.array([4, 4, 3, 3, 3, 2, 2, 2, 2, 2])
    codes = np.empty_like(X)
    for j, k in enumerate(levels):
        edges = np.quantile(X[:, j], np.linspace(0, 1, k + 1)[1:-1])
        codes[:, j] = np.searchsorted(edges, X[:, j])
    Xtr, Xte, ytr, yte = _split(codes, y, 0.3)
    clf = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(Xtr, ytr)
    return MatrixModel("coarse-hgb", "integer codes (2,100 rows, 10 features of 2-4 levels, 3 classes)", Xtr, ytr,
                       Xte, yte, clf, _box(Xtr), integer=True)


def _digits() -> MatrixModel:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X, y, 0.3)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0).fit(Xtr, ytr)
    d = X.shape[1]
    return MatrixModel("digits-mlp", "8x8 images (1,257 rows, 64 pixels, 10 classes)", Xtr, ytr, Xte, yte, clf,
                       (np.zeros(d), np.full(d, 16.0)))


def _embedding() -> MatrixModel:
    """A dense 128-d embedding-like input: tanh of a fixed random projection of standardised digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(X.shape[1], 128)) / 8.0
    Xtr, Xte, ytr, yte = _split(X, (y >= 5).astype(np.int64), 0.3)
    mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0) + 1.0

    def embed(A: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.tanh(((A - mu) / sd) @ W)
        return out

    Etr, Ete = embed(Xtr), embed(Xte)
    clf = LogisticRegression(max_iter=2000).fit(Etr, ytr)
    return MatrixModel("embed-logreg", "128-d embedding (1,257 rows, binary)", Etr, ytr, Ete, yte, clf, _box(Etr))


MODELS: dict[str, Callable[[], MatrixModel]] = {
    "wine-rf": _wine,
    "cancer-svc": _cancer,
    "coarse-hgb": _coarse,
    "digits-mlp": _digits,
    "embed-logreg": _embedding,
}


def load_model(name: str) -> MatrixModel:
    """Build one model of the matrix (deterministic)."""
    return MODELS[name]()


def fit_guard_profile(model: MatrixModel, workdir: Path) -> tuple[Path, str]:
    """Fit the profile with ``guard-agent fit``'s own code (parser and ``run_fit``) on the training split and
    its labels; returns the profile directory and what fit printed (its table of thresholds)."""
    from guard_agent.fit_command import add_fit_arguments, run_fit

    workdir.mkdir(parents=True, exist_ok=True)
    np.save(workdir / "ref.npy", model.X_train)
    np.save(workdir / "labels.npy", model.y_train)
    out = workdir / "profile"
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    args = parser.parse_args(["--data", str(workdir / "ref.npy"), "--labels", str(workdir / "labels.npy"),
                              "--out", str(out), "--force"])
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        status = run_fit(args)
    if status != 0:
        raise RuntimeError(f"guard-agent fit failed for {model.name}: {errors.getvalue()}")
    return out, printed.getvalue() + errors.getvalue()
