"""The scoring seam: named scores for one request, within a time budget.

A scorer turns a parsed request into named scores on the policy's calibrated
[0, 1] scale (higher = more anomalous; the maximum over the batch's rows).
Cheap scorers are synchronous and run inline (numpy on one row costs
microseconds; a thread hop would cost more). Scorers that call the model
(feature squeezing) are async and run under the policy's budget; an overrun or
an exception is reported to ``decide()``, which fails open or closed per policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from guard_agent.batching import TurnBatcher
from guard_agent.contracts import RowScorer
from guard_agent.policy.model import EffectivePolicy, InputSchema

__all__ = [
    "InputSchemaError",
    "RowBatcher",
    "ScoringContext",
    "check_input",
    "declared_schema_score",
    "representable",
    "run_scorers",
    "saturate_detector_scores",
    "within_float32",
]


class InputSchemaError(ValueError):
    """The request breaks the policy's declared input schema: a 400, not a score."""


@dataclass(frozen=True)
class ScoringContext:
    features: np.ndarray          # (rows, n_features) float64
    row_shape: tuple[int, ...]
    model: str | None
    protocol: str
    body: bytes
    policy: EffectivePolicy
    extra: Mapping[str, Any]


def check_input(features: np.ndarray, schema: InputSchema, *, expected_features: int | None,
                in_float32_range: bool = False) -> None:
    """Hard checks that make a request invalid (400) rather than suspicious. ``in_float32_range``: the caller
    found every value within float32's range (``within_float32``), which proves them finite without a scan."""
    rows, n = features.shape
    if schema.max_rows is not None and rows > schema.max_rows:
        raise InputSchemaError(f"batch of {rows} rows exceeds the limit of {schema.max_rows}")
    want = schema.features if schema.features is not None else expected_features
    if want is not None and n != want:
        raise InputSchemaError(f"expected {want} features per row, got {n}")
    if not schema.allow_nonfinite and not in_float32_range and not np.isfinite(features).all():
        raise InputSchemaError("input contains NaN or Infinity, which the policy does not allow")


def declared_schema_score(features: np.ndarray, schema: InputSchema) -> float:
    """1.0 when any value lies outside the declared min/max, else 0.0 (bounds are absolute)."""
    if schema.minimum is None and schema.maximum is None:
        return 0.0
    with np.errstate(invalid="ignore"):
        if schema.minimum is not None:
            low = np.asarray(schema.minimum, dtype=np.float64)
            if low.size not in (1, features.shape[1]) or (features < low).any():
                return 1.0
        if schema.maximum is not None:
            high = np.asarray(schema.maximum, dtype=np.float64)
            if high.size not in (1, features.shape[1]) or (features > high).any():
                return 1.0
    return 0.0


def _row_max(per_row: Mapping[str, np.ndarray], start: int, end: int) -> dict[str, float]:
    if end - start == 1:  # the usual one-row request: its value, without a reduction per score
        return {name: float(values[start]) for name, values in per_row.items()}
    return {name: float(values[start:end].max()) for name, values in per_row.items()}


class RowBatcher:
    """Calibrated scores of concurrent requests from one ``Profile.score`` call per loop turn (see
    ``guard_agent.batching``): each request gets the maximum over its rows of each score, as if alone."""

    def __init__(self, *, max_rows: int = 256) -> None:
        self._batcher: TurnBatcher[RowScorer, Mapping[str, np.ndarray], dict[str, float]] = TurnBatcher(
            lambda profile, rows: profile.score(rows), _row_max, max_rows=lambda _profile: max_rows)

    async def score(self, profile: RowScorer, features: np.ndarray) -> dict[str, float]:
        """The maximum over ``features``' rows of each calibrated score."""
        return await self._batcher(profile, features)


FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest value the detectors score in (they work in float32); beyond it a value cannot be represented."""

_DETECTOR_PREFIX = "ood."


_SQUARES_BOUND = FLOAT32_MAX * FLOAT32_MAX * (1.0 - 1e-6)
"""A sum of squares at most this proves every value finite and within float32's range (see ``within_float32``)."""


def within_float32(features: np.ndarray) -> bool:
    """Whether every value is finite and within float32's range: true for the usual request, which then needs
    no element-wise scan in ``check_input`` nor in ``representable``.

    First one dot product: a sum of non-negative squares never rounds below any of its terms, so a sum within
    ``_SQUARES_BOUND`` bounds every value (NaN and infinities make it NaN or infinite). Only a sum beyond it
    (huge values, NaN, infinities) takes the exact test, two reductions (NaN and infinities fail both)."""
    if not features.size:
        return False
    if float(np.vdot(features, features)) <= _SQUARES_BOUND:
        return True
    return bool(features.min() >= -FLOAT32_MAX and features.max() <= FLOAT32_MAX)


def representable(features: np.ndarray, *, in_range: bool | None = None) -> tuple[np.ndarray, bool]:
    """The features clipped to the float32 range, and whether any finite value lay beyond it. ``in_range``:
    ``within_float32(features)`` when the caller has it already.

    A finite float64 beyond float32's range (``3.4028236e38``) would make the detectors refuse the row, and a
    refused row must not read as a scoring error that ``failure.on_error: open`` lets through: such a value is
    as far out as an input gets, so it is scored at the range's edge and its detector scores saturated
    (``saturate_detector_scores``). NaN and infinities are left as they are (``check_input`` rules on them).
    """
    if in_range if in_range is not None else within_float32(features):
        return features, False  # the usual case (NaN and infinities fail it: looked at below)
    with np.errstate(invalid="ignore"):
        beyond = np.isfinite(features) & (np.abs(features) > FLOAT32_MAX)
    if not beyond.any():
        return features, False
    return np.where(beyond, np.copysign(FLOAT32_MAX, features), features), True


def saturate_detector_scores(scores: dict[str, float], provided: frozenset[str]) -> None:
    """Every detector score (``ood.*``) the profile provides set to 1.0: an unrepresentable value is maximally out."""
    for name in provided:
        if name.startswith(_DETECTOR_PREFIX):
            scores[name] = 1.0


async def run_scorers(
    ctx: ScoringContext,
    sync_scorers: tuple[Callable[[ScoringContext], Mapping[str, float]], ...],
    async_scorers: tuple[Callable[[ScoringContext], Awaitable[Mapping[str, float]]], ...],
    *,
    batched: Callable[[ScoringContext], Awaitable[Mapping[str, float]]] | None = None,
) -> tuple[dict[str, float], Literal["error", "budget"] | None]:
    """All scores for one request; merged by max, so a score two scorers provide keeps the worse.

    ``batched`` (the profile's detectors) is awaited inline, not under the budget: it only waits for the end of
    the current loop turn, never for I/O.
    """
    scores: dict[str, float] = {}
    failure: Literal["error", "budget"] | None = None

    def merge(new: Mapping[str, float]) -> None:
        for name, value in new.items():
            v = float(value)
            if v != v:  # NaN from a broken scorer must not silently pass a threshold test
                raise ValueError(f"scorer produced NaN for {name}")
            prev = scores.get(name)
            scores[name] = v if prev is None or v > prev else prev

    for scorer in sync_scorers:
        try:
            merge(scorer(ctx))
        except Exception:
            failure = "error"
    if batched is not None:
        try:
            merge(await batched(ctx))
        except Exception:
            failure = "error"
    if async_scorers:
        budget = ctx.policy.failure.budget_ms / 1000.0
        tasks = [asyncio.ensure_future(s(ctx)) for s in async_scorers]
        done, pending = await asyncio.wait(tasks, timeout=budget)
        for task in pending:
            task.cancel()
            failure = failure or "budget"
        for task in done:
            exc = task.exception()
            if exc is not None:
                failure = "error"
                continue
            try:
                merge(task.result())
            except ValueError:
                failure = "error"
    return scores, failure
