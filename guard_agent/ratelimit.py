"""The session's admission state as pure functions: the token bucket and the block cool-down.

The live request path (``proxy``) and the replay (``tuning.replay``) both call these, so a replay cannot
drift from what the guard does: no I/O, no clock (``now`` is passed in), works on any session store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guard_agent.policy.model import Decision, EffectivePolicy, RateLimit

__all__ = ["Bucket", "cooldown_start", "rate_check", "take"]


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


def rate_check(bucket: Bucket | None, now: float, limit: RateLimit | None) -> tuple[Bucket | None, bool, float]:
    """One request against the session's limit: (new bucket, rate limited, seconds until allowed). Without a
    limit the bucket stays as it is and nothing is limited."""
    if limit is None:
        return bucket, False, 0.0
    new, allowed, retry_after = take(bucket, now, rate=limit.rate, burst=limit.burst)
    return new, not allowed, retry_after


def cooldown_start(decision: Decision, policy: EffectivePolicy, now: float,
                   blocked_rule: str | None) -> tuple[float, str] | None:
    """``(blocked until, rule)`` when this decision starts a cool-down: an enforced block while none runs
    (``blocked_rule`` None), with the rule's own cool-down or else the policy's, when positive."""
    cooldown = policy.block_cooldown if decision.cooldown is None else decision.cooldown
    if decision.enforced and decision.action == "block" and cooldown > 0 and blocked_rule is None:
        return now + cooldown, decision.rule
    return None
