"""A text profile: the projection and checks as one profile component, then the ordinary detectors.

``fit_text_profile`` hashes and projects the reference texts, then fits the same calibrated detectors as
numeric inputs on the projection (``fit_profile``) with the text part stored as the extra component
``text`` (plain arrays, no pickles). ``TextModel.from_profile`` rebuilds it in the guard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..profile import Profile, fit_profile
from ._checks import TextChecks
from ._projection import TextProjection

__all__ = ["TEXT_COMPONENT", "TextModel", "fit_text_profile"]

TEXT_COMPONENT = "text"


@dataclass(frozen=True)
class TextModel:
    """What the guard needs to turn texts into features and check scores."""

    projection: TextProjection
    checks: TextChecks

    def features(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.projection.transform(texts)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        p_params, p_arrays = self.projection.to_parts()
        c_params, c_arrays = self.checks.to_parts()
        return {"projection": p_params, "checks": c_params}, {**p_arrays, **c_arrays}

    @classmethod
    def from_parts(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TextModel:
        projection = TextProjection.from_parts(params["projection"], arrays)
        checks = TextChecks.from_parts(params["checks"], arrays)
        return cls(projection=projection, checks=checks)

    @classmethod
    def from_profile(cls, profile: Profile) -> TextModel | None:
        """The profile's text part, or None for a numeric profile; ValueError when it is inconsistent."""
        part = profile.components.get(TEXT_COMPONENT)
        if part is None:
            return None
        model = cls.from_parts(*part)
        if profile.n_features != model.projection.n_components + 2:
            raise ValueError("text component does not match the profile's feature count")
        return model


def fit_text_profile(
    texts: Sequence[str],
    *,
    labels: npt.NDArray[Any] | None = None,
    n_components: int = 32,
    fpr: float = 0.01,
    seed: int = 0,
    detectors: Sequence[str] | None = None,
    clock: Callable[[], float] | None = None,
    extra_components: Mapping[str, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]] | None = None,
) -> tuple[Profile, npt.NDArray[np.float64]]:
    """Fit projection, checks and detectors on reference texts; returns the profile and the projected rows
    (for fitting the session trackers on the same features)."""
    texts = list(texts)
    if len(texts) < 10 * (n_components + 2) // 4:
        raise ValueError(f"need at least {10 * (n_components + 2) // 4} reference texts for {n_components} "
                         "components")
    projection = TextProjection(n_components=n_components, seed=seed).fit(texts)
    checks = TextChecks().fit(texts)
    Z = projection.transform(texts)
    model = TextModel(projection=projection, checks=checks)
    extras = {TEXT_COMPONENT: model.to_parts(), **dict(extra_components or {})}
    profile = fit_profile(Z, labels=labels, fpr=fpr, seed=seed, detectors=detectors,
                          feature_names=projection.feature_names, clock=clock, extra_components=extras)
    return profile, Z


