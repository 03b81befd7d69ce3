"""The profile store: load detector profiles, score requests with them, hot-reload like the policy.

``GUARD_PROFILE`` is one profile directory (``profile.json`` inside), or a
directory of per-model profiles (``<model>/profile.json``). A changed profile is
loaded and verified (schema, sha256 of every array) before it replaces the
active one; a broken one is rejected, logged and counted, and the last good
profile stays. Every decision event carries the active profile revision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from detectors import Profile, ProfileError, load_profiles
from detectors.text import TextModel
from guard_agent.filewatch import file_identity
from guard_agent.scoring import RowBatcher, ScoringContext
from guard_agent.text_scoring import text_model_of

__all__ = ["ProfileStore"]

_ANY_MODEL = ""


class ProfileStore:
    """Implements the ``ProfileSource`` seam of ``guard_agent.contracts``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.profiles: dict[str, Profile] = {}
        self._identities: dict[Path, tuple[int, int, int, int] | None] = {}
        self._batcher = RowBatcher()
        self._load()  # the first load must succeed

    def _watched(self) -> dict[Path, tuple[int, int, int, int] | None]:
        files = [self.path / "profile.json"]
        if self.path.is_dir():  # per-model profiles; dot entries are the kubelet's ..data / ..<timestamp>
            files += [d / "profile.json" for d in self.path.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return {f: file_identity(f) for f in files}

    def _load(self) -> None:
        identities = self._watched()
        profiles = load_profiles(self.path)
        for profile in profiles.values():
            text_model_of(profile)  # a broken text component fails the load, not a request
        self.profiles = profiles
        self._identities = identities

    @property
    def revision(self) -> str | None:
        if not self.profiles:
            return None
        if set(self.profiles) == {_ANY_MODEL}:
            return self.profiles[_ANY_MODEL].revision
        joined = ";".join(f"{m}:{p.revision}" for m, p in sorted(self.profiles.items()))
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def score_names(self) -> frozenset[str]:
        names: set[str] = set()
        for profile in self.profiles.values():
            names |= set(profile.score_names)
        return frozenset(names)

    def profile_for(self, model: str | None) -> Profile | None:
        if _ANY_MODEL in self.profiles:
            return self.profiles[_ANY_MODEL]
        if model is not None and model in self.profiles:
            return self.profiles[model]
        if model is None and len(self.profiles) == 1:
            return next(iter(self.profiles.values()))
        return None

    def expected_features(self, model: str | None) -> int | None:
        profile = self.profile_for(model)
        return None if profile is None else profile.n_features

    def text_model(self, model: str | None) -> TextModel | None:
        return text_model_of(self.profile_for(model))

    def score(self, ctx: ScoringContext) -> Mapping[str, float]:
        """Calibrated scores, the maximum over the batch's rows (the most anomalous row decides)."""
        profile = self.profile_for(ctx.model)
        if profile is None:
            return {}
        return {name: float(values.max()) for name, values in profile.score(ctx.features).items()}

    async def score_batched(self, ctx: ScoringContext) -> Mapping[str, float]:
        """``score``, with the rows of every request scored in the same event-loop turn scored in one call."""
        profile = self.profile_for(ctx.model)
        if profile is None:
            return {}
        return await self._batcher.score(profile, ctx.features)

    def changed_on_disk(self) -> bool:
        """Whether any profile.json changed identity since the last load (or the last rejected one)."""
        return self._watched() != self._identities

    def reload(self) -> None:
        """Load the changed files; on an error the last good profiles stay and these files are not retried
        until they change again."""
        try:
            self._load()
        except (ProfileError, OSError, ValueError):
            self._identities = self._watched()
            raise
