"""Text requests in the guard: re-project with the model's text profile, and the cheap character checks.

The parser gives every text request the default (random) projection as features. When the model's profile
was fitted with ``guard-agent fit --text``, ``project_texts`` replaces them with the fitted projection the
detectors and trackers were calibrated on. ``text_check_scores`` gives the four ``text.*`` scores, calibrated
on the reference texts when there is a text profile, plain presence (0 or 1) otherwise.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from detectors import Profile, ProfileError
from detectors.text import CHECK_NAMES, TextChecks, TextModel
from guard_agent.protocols import ParsedRequest, ProtocolError

__all__ = ["TEXT_SCORES", "TextModels", "project_texts", "text_check_scores", "text_model_of"]

TEXT_SCORES: frozenset[str] = frozenset(CHECK_NAMES)
_UNFITTED = TextChecks()
_CACHE: weakref.WeakKeyDictionary[Profile, TextModel | None] = weakref.WeakKeyDictionary()


class TextModels(Protocol):
    """What these functions need from the profile store."""

    def text_model(self, model: str | None) -> TextModel | None: ...

    def expected_features(self, model: str | None) -> int | None: ...


def text_model_of(profile: Profile | None) -> TextModel | None:
    """The profile's text part (built once per loaded profile); ProfileError when it is inconsistent."""
    if profile is None:
        return None
    if profile not in _CACHE:
        try:
            _CACHE[profile] = TextModel.from_profile(profile)
        except (KeyError, ValueError, TypeError) as exc:
            raise ProfileError(f"text component: {exc}") from exc
    return _CACHE[profile]


def project_texts(profiles: TextModels, parsed: ParsedRequest, model: str | None) -> ParsedRequest:
    """``parsed`` with the fitted text projection as features (unchanged for numeric requests, or without any
    profile); ProtocolError (a 400) for text sent to a model whose profile is numeric."""
    if not parsed.texts:
        return parsed
    text_model = profiles.text_model(model)
    if text_model is None:
        if profiles.expected_features(model) is not None:
            raise ProtocolError("text inputs, but this model's profile was fitted on numbers (fit --text for text)")
        return parsed
    if parsed.hashed_texts is not None:
        features = text_model.projection.transform_hashed(parsed.hashed_texts)
    else:
        features = text_model.features(parsed.texts)
    return dataclasses.replace(parsed, features=features, row_shape=(features.shape[1],))


def text_check_scores(profiles: TextModels, parsed: ParsedRequest, model: str | None) -> Mapping[str, float]:
    """The ``text.*`` scores of a text request (maximum over its texts); nothing for numeric requests."""
    if not parsed.texts:
        return {}
    text_model = profiles.text_model(model)
    checks = _UNFITTED if text_model is None else text_model.checks
    return {name: float(np.max(values)) for name, values in checks.score(parsed.texts).items()}
