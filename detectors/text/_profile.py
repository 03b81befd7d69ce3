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
        if profile.n_features != model.projection.n_components + 3:
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
    trackers: bool = True,
) -> tuple[Profile, npt.NDArray[np.float64]]:
    """Fit projection, checks, detectors and (``trackers``) the session trackers' configuration on reference
    texts; returns the profile and the projected reference rows the detectors were fitted on (half of them:
    the other half fitted the projection)."""
    texts = list(texts)
    n = len(texts)
    if n < 20 * (n_components + 3) // 4:
        raise ValueError(f"need at least {20 * (n_components + 3) // 4} reference texts for {n_components} "
                         "components")
    # The projection is fitted on one half and the detectors on the other half's projection: fitted and
    # scored on the same texts, every n-gram would be known and the residual small, which live texts never
    # are (held-out texts would then all look out of distribution).
    order = np.random.default_rng(seed).permutation(n)
    half_a, half_b = order[: n // 2], order[n // 2:]
    projection = TextProjection(n_components=n_components, seed=seed).fit([texts[i] for i in half_a])
    checks = TextChecks().fit(texts)
    Z = projection.transform([texts[i] for i in half_b])
    labels = None if labels is None else np.asarray(labels)[half_b]
    model = TextModel(projection=projection, checks=checks)
    extras = {TEXT_COMPONENT: model.to_parts()}
    if trackers:
        from ..trackers import fit_tracker_config

        classes = None if labels is None else np.unique(np.asarray(labels), return_inverse=True)[1]
        extras["trackers"] = fit_tracker_config(Z, classes, seed=seed).to_parts()
    profile = fit_profile(Z, labels=labels, fpr=fpr, seed=seed, detectors=detectors,
                          feature_names=projection.feature_names, clock=clock, extra_components=extras)
    return profile, Z


