"""Lazy bridges to the Adversarial Robustness Toolbox (the ``[attack]`` extra); nothing here imports
ART at module import time, so the guard itself never needs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["black_box_classifier", "sklearn_thief"]


def black_box_classifier(predict: Callable[[np.ndarray], np.ndarray], n_features: int, n_classes: int,
                         clip: tuple[float, float]) -> Any:
    """An ART BlackBoxClassifier whose predict is ``predict`` (rows -> one-hot or probabilities)."""
    from art.estimators.classification import BlackBoxClassifier

    return BlackBoxClassifier(predict, input_shape=(n_features,), nb_classes=n_classes, clip_values=clip)


def sklearn_thief(model: Any, clip: tuple[float, float]) -> Any:
    """A scikit-learn thief model for ART's extraction attacks.

    ART's CopycatCNN and KnockoffNets call ``fit(x, y, batch_size=..., nb_epochs=..., verbose=...)``,
    arguments a scikit-learn estimator does not take; this subclass drops them.
    """
    from art.estimators.classification.scikitlearn import ScikitlearnClassifier

    class SklearnThief(ScikitlearnClassifier):  # type: ignore[misc]
        def fit(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
            for name in ("batch_size", "nb_epochs", "verbose"):
                kwargs.pop(name, None)
            super().fit(x, y, **kwargs)

    return SklearnThief(model, clip_values=clip)
