"""Token bucket as a pure function over a small state (works on any session store)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Bucket", "take"]


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated: float


def take(bucket: Bucket | None, now: float, *, rate: float, burst: float,
         cost: float = 1.0) -> tuple[Bucket, bool, float]:
    """Spend ``cost`` tokens; return (new bucket, allowed, seconds until allowed)."""
    tokens = burst if bucket is None else min(burst, bucket.tokens + max(0.0, now - bucket.updated) * rate)
    if tokens >= cost:
        return Bucket(tokens - cost, now), True, 0.0
    return Bucket(tokens, now), False, (cost - tokens) / rate
