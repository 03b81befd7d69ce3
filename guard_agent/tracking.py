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

import struct
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from detectors.trackers import GlobalFingerprintIndex, SessionTrackers, TrackerConfig, Update, answer_labels
from guard_agent.batching import TurnBatcher, TurnQueue
from guard_agent.contracts import Density, GlobalObserver, ProfileSource, Trackers
from guard_agent.protocols import ParsedResponse
from guard_agent.sessions.base import SessionRecord

__all__ = ["SessionTracking"]

GLOBAL = "session.global_fingerprint"
_MAX_DEFAULT_ENGINES = 8
# One state per layout (model profile or feature width): a session alternating between two models keeps
# both histories instead of resetting them on every switch (which would hide an attack).
_MAX_LAYOUTS = 4
_MAX_DEFAULT_FEATURES = 1 << 16  # widths a stored state may make this process build a default engine for
_STATE_VERSION = b"\x02"
_MAX_PENDING = 4096  # requests between peek and update (in flight to the model)

NO_PROFILE = ("no profile with fitted trackers is loaded (guard-agent fit): off-manifold and neighbour evidence "
              "need the reference data")
LABELS_ONLY = ("the model answers labels only, no probabilities: small margins cannot be seen (MLServer's "
               "sklearn runtime: ask for the predict_proba output, docs/sessions.md)")
NO_ANSWER = ("the model's answers carry neither labels nor probabilities the guard can read: near-duplicates "
             "answered with another class (boundary searches) cannot be told from benign edits")


class SessionTracking(Trackers):
    """Implements the ``Trackers`` seam of ``guard_agent.contracts``."""

    def __init__(self, configs: Mapping[str, TrackerConfig], *, salt: bytes,
                 global_index: GlobalFingerprintIndex | None = None,
                 on_inactive: Callable[[Mapping[str, str]], None] | None = None) -> None:
        """``on_inactive`` is called with ``inactive()`` whenever it changes (the answers the model gives decide
        part of it: a label-only model turns the margin tracker off)."""
        self._salt = salt
        self._on_inactive = on_inactive
        self._answer_kind: str | None = None  # "probabilities", "labels" or "none": what the last answer carried
        self._engines: dict[str, SessionTrackers] = {k: SessionTrackers(c, salt=salt) for k, c in configs.items()}
        self._defaults: dict[int, SessionTrackers] = {}
        self.global_index = global_index if global_index is not None else GlobalFingerprintIndex()  # len() 0 is falsy
        self._global: GlobalObserver = _LocalGlobal(self.global_index)
        self.score_names = frozenset(SessionTrackers.score_names | {GLOBAL})
        self._pending: dict[int, tuple[weakref.ref[np.ndarray], SessionTrackers, _Hashes]] = {}
        # concurrent requests' hashes in one call: rows are hashed independently up to max_rows_tracked rows
        self._hashes: TurnBatcher[SessionTrackers, _Hashes, _Hashes] = TurnBatcher(
            lambda engine, rows: engine.request_hashes(rows), _rows_of,
            max_rows=lambda engine: engine.config.max_rows_tracked)
        # concurrent requests' updates in one call per engine (SessionTrackers.update_many)
        self._updates: TurnQueue[SessionTrackers, _Job, Mapping[str, float] | Exception] = TurnQueue(self._run_updates)

    @property
    def pending(self) -> int:
        """Requests peeked whose hashes wait for their update: none outlives its request, so this stays small."""
        return len(self._pending)

    def inactive(self) -> dict[str, str]:
        """Session scores that cannot work with this profile and these answers, each with the reason (the guard
        logs it at start and when it changes, ``/readyz`` lists it, a metric counts it)."""
        out: dict[str, str] = {}
        if not any(engine.config.fitted for engine in self._engines.values()):
            out["session.coverage"] = out["session.neighbors"] = out["session.crawl"] = NO_PROFILE
        if self._answer_kind == "labels":
            out["session.margin"] = LABELS_ONLY
        elif self._answer_kind == "none":
            for name in ("session.margin", "session.fingerprint", "session.neighbors", GLOBAL):
                out[name] = NO_ANSWER
        return out

    def _saw_answer(self, labels: np.ndarray | None, probabilities: np.ndarray | None) -> None:
        kind = "probabilities" if probabilities is not None else "labels" if labels is not None else "none"
        if kind != self._answer_kind:
            self._answer_kind = kind
            if self._on_inactive is not None:
                self._on_inactive(self.inactive())

    @classmethod
    def from_profile(cls, profile: ProfileSource, *, salt: bytes, global_index: GlobalFingerprintIndex | None = None,
                     on_inactive: Callable[[Mapping[str, str]], None] | None = None) -> SessionTracking:
        configs: dict[str, TrackerConfig] = {}
        for model, p in profile.profiles.items():
            part = p.components.get("trackers")
            if part is not None:
                configs[model] = TrackerConfig.from_parts(*part)
        return cls(configs, salt=salt, global_index=global_index, on_inactive=on_inactive)

    def engine(self, model: str | None, n_features: int) -> SessionTrackers:
        """The engine for this model: its profile's config, else a default one for the feature count."""
        engine = self.existing_engine(model, n_features)
        if engine is not None:
            return engine
        if n_features not in self._defaults:
            if len(self._defaults) >= _MAX_DEFAULT_ENGINES:  # the width is client-controlled: bound the cache
                self._defaults.pop(next(iter(self._defaults)))
            self._defaults[n_features] = SessionTrackers(TrackerConfig.default(n_features), salt=self._salt)
        return self._defaults[n_features]

    def existing_engine(self, model: str | None, n_features: int) -> SessionTrackers | None:
        """The engine for this model and width if it exists already (building a default one costs up to
        ~0.1 s for very wide inputs)."""
        engine = self._engines.get("") or self._engines.get(model or "")
        if engine is not None and engine.config.n_features == n_features:
            return engine
        return self._defaults.get(n_features)

    def _state(self, record: SessionRecord, engine: SessionTrackers) -> Any:
        """The session's state for this engine's layout (a state of another config is never reused)."""
        held = record.tracker_state  # Mapping[layout id, state]
        state = held.get(engine.config.layout_id) if held is not None else None
        return state if state is not None else engine.new_state()

    async def peek(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
             now: float) -> Mapping[str, float]:
        engine = self.existing_engine(model, features.shape[1])
        if engine is None and len(self._defaults) < _MAX_DEFAULT_ENGINES:
            engine = self.engine(model, features.shape[1])
        if engine is None:
            # a new width while the default-engine cache is full: only ``update`` (after the model accepted a
            # request of that width) evicts one to build it, so a client cycling widths the model refuses
            # cannot make every request build an engine (~0.1 s for very wide inputs); the session has no
            # history at this width yet anyway
            return dict.fromkeys(self.score_names, 0.0)
        scores = dict(engine.peek(self._state(record, engine), now))
        hashes = self._recall(features, engine)  # a second session of the request (its client address's)
        if hashes is None:
            hashes = await self._hashes(engine, features)  # features checked and hashed once per request
            self._remember(features, engine, hashes)
        fingerprints, keys, _ = hashes
        threshold = self.global_index.match_threshold

        def density(i: int) -> float:  # the index asks only for rows that have near-duplicates
            return float(engine.reference_density(fingerprints[i : i + 1], threshold)[0])

        scores[GLOBAL] = await self.observe_global(session, fingerprints, keys, now, density)
        return scores

    def share_global(self, observer: GlobalObserver) -> None:
        """Answer ``session.global_fingerprint`` from ``observer`` (a shared index over every replica) instead of
        this process's own index, which ``observer`` keeps warm as its fallback."""
        self._global = observer

    async def observe_global(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                             density: Density = None) -> float:
        """This query against earlier queries of every session."""
        return await self._global.observe(session, fingerprints, digests, now, density)

    def _remember(self, features: np.ndarray, engine: SessionTrackers, hashes: _Hashes) -> None:
        """Keep the request's hashes (tracked rows only: at most ``max_rows_tracked``) for the request's other
        ``peek`` and its ``update``s, so they are computed once per request. The entry holds the features array
        only weakly and goes when the array does: a request refused before ``update`` (blocked, upstream error)
        leaves nothing behind."""
        key = id(features)
        pending = self._pending

        def forget(_ref: weakref.ref[np.ndarray]) -> None:
            held = pending.get(key)
            if held is not None and held[0] is _ref:
                del pending[key]

        if len(pending) >= _MAX_PENDING:  # only requests in flight at once: a backstop, never reached in use
            pending.pop(next(iter(pending)))
        pending[key] = (weakref.ref(features, forget), engine, hashes)

    def _recall(self, features: np.ndarray, engine: SessionTrackers) -> _Hashes | None:
        """The hashes ``peek`` computed for this very array with this very engine, else None."""
        held = self._pending.get(id(features))
        if held is not None and held[0]() is features and held[1] is engine:
            return held[2]
        return None

    def _engine_by_layout(self, layout: int) -> SessionTrackers | None:
        for engine in (*self._engines.values(), *self._defaults.values()):
            if engine.config.layout_id == layout:
                return engine
        return None

    def encode_state(self, held: Any) -> bytes | None:
        """``{layout id: state}`` as a version byte, then per layout: 8 bytes of layout id, 4 of feature count,
        4 of length, and the engine's compact encoding. Layouts no engine here knows are left out."""
        if held is None:
            return None
        parts = [_STATE_VERSION]
        for layout, state in held.items():
            engine = self._engine_by_layout(layout)
            if engine is None or state is None:
                continue
            body = engine.encode(state)
            parts.append(struct.pack("<QII", int(layout), engine.config.n_features, len(body)) + body)
        return b"".join(parts) if len(parts) > 1 else None

    def decode_state(self, data: bytes) -> Any:
        """Inverse of ``encode_state``; ValueError for garbage or a layout this process cannot build (a
        default layout is built for its feature count, as a request of that width would)."""
        if data[:1] != _STATE_VERSION:
            raise ValueError("tracker state of an unknown version")
        states: dict[int, Any] = {}
        pos = 1
        while pos < len(data):
            if len(data) - pos < 16 or len(states) >= _MAX_LAYOUTS:
                raise ValueError("tracker state truncated or too many layouts")
            layout, n_features, size = struct.unpack_from("<QII", data, pos)
            pos += 16
            body = data[pos : pos + size]
            pos += size
            if len(body) != size:
                raise ValueError("tracker state truncated")
            engine = self._engine_by_layout(layout)
            if engine is None and 0 < n_features <= _MAX_DEFAULT_FEATURES:
                default = self.engine(None, n_features)
                engine = default if default.config.layout_id == layout else None
            if engine is None:
                raise ValueError("tracker state of an unknown layout")
            states[layout] = engine.decode(body)
        return states

    async def update(self, session: str, record: SessionRecord, features: np.ndarray, model: str | None,
               response: ParsedResponse | None, now: float, scores: Mapping[str, float]) -> Mapping[str, float]:
        engine = self.engine(model, features.shape[1])
        labels = None if response is None else response.labels
        probabilities = None if response is None else response.probabilities
        if labels is not None and len(labels) != features.shape[0]:
            labels = None
        if probabilities is not None and probabilities.shape[0] != features.shape[0]:
            probabilities = None
        self._saw_answer(labels, probabilities)
        hashes = self._recall(features, engine)
        fingerprints, digests = (None, None) if hashes is None else (hashes[0], hashes[2])
        arguments = partial(Update, X=features, labels=labels, probabilities=probabilities, now=now,
                            global_fingerprint=scores.get(GLOBAL), fingerprints=fingerprints, digests=digests)
        new_scores = await self._updates(engine, _Job(record, arguments))
        if isinstance(new_scores, Exception):
            raise new_scores
        answered = answer_labels(labels, probabilities, features.shape[0])
        if hashes is not None and answered is not None:
            tracked = engine.tracked_rows(hashes[2])  # the rows peek fingerprinted
            await self._global.learn(session, hashes[0], hashes[1],
                                     answered if tracked is None else answered[tracked], now)
        return new_scores

    def _run_updates(self, engine: SessionTrackers, jobs: list[_Job]) -> list[Mapping[str, float] | Exception]:
        """The updates of one turn (``SessionTrackers.update_many``): each from its record's state as it is
        then, so two requests of one record go one after the other, as they would alone; each record keeps its
        new state. Per job its new scores, or the error its request alone raised."""
        results: list[Mapping[str, float] | Exception] = [{}] * len(jobs)
        pending = list(range(len(jobs)))
        while pending:
            batch: list[int] = []
            later: list[int] = []
            records: set[int] = set()
            for j in pending:
                (later if id(jobs[j].record) in records else batch).append(j)
                records.add(id(jobs[j].record))
            requests = [jobs[j].request(self._state(jobs[j].record, engine)) for j in batch]
            outs: list[tuple[Any, Mapping[str, float]] | Exception]
            try:
                outs = list(engine.update_many(requests))
            except Exception:  # one request's rows are not acceptable: each alone below, each its own error
                outs = [_alone(engine, request) for request in requests]
            for j, out in zip(batch, outs, strict=True):
                if isinstance(out, Exception):
                    results[j] = out
                    continue
                record = jobs[j].record
                record.tracker_state = _with_state(record.tracker_state, engine.config.layout_id, out[0])
                results[j] = out[1]
            pending = later
        return results


@dataclass(frozen=True, slots=True)
class _Job:
    """A request's update waiting for the end of the turn: the record it reads and writes, and
    ``SessionTrackers.update``'s other arguments, given the record's state as it is when the turn ends."""

    record: SessionRecord
    arguments: Callable[[Any], Update]

    def request(self, state: Any) -> Update:
        return self.arguments(state)


def _alone(engine: SessionTrackers, request: Update) -> tuple[Any, Mapping[str, float]] | Exception:
    try:
        return engine.update_many([request])[0]
    except Exception as exc:  # handed to the request that caused it
        return exc


class _LocalGlobal:
    """The in-process global index as a ``GlobalObserver``."""

    def __init__(self, index: GlobalFingerprintIndex) -> None:
        self._index = index

    async def observe(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                      density: Density = None) -> float:
        return float(self._index.observe(session, fingerprints, digests, now, density))

    async def learn(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, labels: np.ndarray,
                    now: float) -> None:
        self._index.learn(fingerprints, labels, now, digests)


_Hashes = tuple[np.ndarray, np.ndarray, np.ndarray]


def _rows_of(hashes: _Hashes, start: int, end: int) -> _Hashes:
    """One request's rows of ``request_hashes`` over a batch of requests (all rows tracked: no subsample)."""
    fingerprints, keys, digests = hashes
    return fingerprints[start:end], keys[start:end], digests[start:end]


def _with_state(held: Mapping[int, Any] | None, layout: int, state: Any) -> dict[int, Any]:
    """A new ``{layout: state}`` with this layout's state the newest; at most ``_MAX_LAYOUTS`` layouts, so a
    client that sends requests of many widths cannot grow a session without bound (the oldest goes)."""
    states = {k: v for k, v in (held or {}).items() if k != layout}
    states[layout] = state
    while len(states) > _MAX_LAYOUTS:
        states.pop(next(iter(states)))
    return states
