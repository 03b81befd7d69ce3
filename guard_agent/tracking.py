"""Session tracking in the guard: runs the ``detectors.trackers`` engines on session records.

The tracker configuration comes from the profile (component ``trackers``, fitted
on the reference data by ``guard-agent fit``); without one, a default
configuration per feature count is used (documented as weaker). The decision for
query n sees the session as of query n-1 (``peek``) plus this query's match
against the global fingerprint index (queries from every session); the session
state learns query n after the model answered (``update``), when the predicted
class and probabilities are known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from detectors.trackers import GlobalFingerprintIndex, SessionTrackers, TrackerConfig
from guard_agent.sessions.base import SessionRecord
from guard_agent.state import TrackerHook

__all__ = ["SessionTracking"]

GLOBAL = "session.global_fingerprint"
_MAX_DEFAULT_ENGINES = 8


class SessionTracking(TrackerHook):
    """Implements the ``TrackerHook`` seam of ``guard_agent.state``."""

    def __init__(self, configs: Mapping[str, TrackerConfig], *, salt: bytes,
                 global_index: GlobalFingerprintIndex | None = None) -> None:
        self._salt = salt
        self._engines: dict[str, SessionTrackers] = {k: SessionTrackers(c, salt=salt) for k, c in configs.items()}
        self._defaults: dict[int, SessionTrackers] = {}
        self.global_index = global_index or GlobalFingerprintIndex()
        self.score_names = frozenset(SessionTrackers.score_names | {GLOBAL})

    @classmethod
    def from_profile(cls, profile: Any, *, salt: bytes) -> SessionTracking:
        configs: dict[str, TrackerConfig] = {}
        for model, p in (getattr(profile, "profiles", None) or {}).items():
            part = p.components.get("trackers")
            if part is not None:
                configs[model] = TrackerConfig.from_parts(*part)
        return cls(configs, salt=salt)

    def engine(self, model: str | None, n_features: int) -> SessionTrackers:
        """The engine for this model: its profile's config, else a default one for the feature count."""
        engine = self._engines.get("") or self._engines.get(model or "")
        if engine is not None and engine.config.n_features == n_features:
            return engine
        if n_features not in self._defaults:
            if len(self._defaults) >= _MAX_DEFAULT_ENGINES:  # the width is client-controlled: bound the cache
                self._defaults.pop(next(iter(self._defaults)))
            self._defaults[n_features] = SessionTrackers(TrackerConfig.default(n_features), salt=self._salt)
        return self._defaults[n_features]

    def _state(self, record: SessionRecord, engine: SessionTrackers) -> Any:
        held = record.tracker_state  # (layout id, state): a state of another config is never reused
        if held is None or held[0] != engine.config.layout_id:
            return engine.new_state()
        return held[1]

    async def peek(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
             now: float) -> Mapping[str, float]:
        engine = self.engine(model, features.shape[1])
        scores = dict(engine.peek(self._state(record, engine), now))
        scores[GLOBAL] = await self.observe_global(session, engine.fingerprints(features), now)
        return scores

    async def observe_global(self, session: str, fingerprints: np.ndarray, now: float) -> float:
        """This query against earlier queries of every session (a shared store may override this)."""
        return float(self.global_index.observe(session, fingerprints, now))

    def _engine_by_layout(self, layout: int) -> SessionTrackers | None:
        for engine in (*self._engines.values(), *self._defaults.values()):
            if engine.config.layout_id == layout:
                return engine
        return None

    def encode_state(self, held: Any) -> bytes | None:
        """``(layout id, state)`` as 8 bytes of layout id + the engine's compact encoding."""
        if held is None:
            return None
        layout, state = held
        engine = self._engine_by_layout(layout)
        if engine is None:
            return None
        return int(layout).to_bytes(8, "little") + engine.encode(state)

    def decode_state(self, data: bytes) -> Any:
        """Inverse of ``encode_state``; ValueError for garbage or a layout this process does not know."""
        if len(data) < 8:
            raise ValueError("tracker state too short")
        layout = int.from_bytes(data[:8], "little")
        engine = self._engine_by_layout(layout)
        if engine is None:
            raise ValueError("tracker state of an unknown layout")
        return (layout, engine.decode(data[8:]))

    async def update(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
               response: Any, now: float, scores: Mapping[str, float]) -> Mapping[str, float]:
        engine = self.engine(model, features.shape[1])
        labels = getattr(response, "labels", None)
        probabilities = getattr(response, "probabilities", None)
        if labels is not None and len(labels) != features.shape[0]:
            labels = None
        if probabilities is not None and probabilities.shape[0] != features.shape[0]:
            probabilities = None
        state, new_scores = engine.update(self._state(record, engine), features, labels, probabilities, now,
                                          global_fingerprint=scores.get(GLOBAL))
        record.tracker_state = (engine.config.layout_id, state)
        return new_scores
