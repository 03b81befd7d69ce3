"""What an attack run reports."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AttackResult"]


@dataclass(frozen=True)
class AttackResult:
    """One attack run: how many queries it sent and got answered, whether the guard stopped it (all its
    keys refused), and whether it reached its goal with the answers it got."""

    name: str
    run_id: str
    keys: int
    sent: int
    answered: int
    stopped: bool
    success: bool
    detail: dict[str, float] = field(default_factory=dict)
