"""Reloads of the policy and the profile, in one place.

The file watcher, SIGHUP and ``POST /admin/reload`` all come here. A new profile may provide other scores, so
a profile that changed is followed by a policy reload (a rule naming a score the new profile lacks is
skipped with a warning, one it gained is compiled in). A bad file is rejected, logged and counted; the last
good one stays active.
"""

from __future__ import annotations

from collections.abc import Callable

from detectors import ProfileError
from guard_agent.contracts import ProfileSource
from guard_agent.events import EventLogger
from guard_agent.metrics import Metrics
from guard_agent.policy.store import PolicyStore

__all__ = ["Reloader"]


class Reloader:
    """Reloads with their metrics and log lines; ``available_scores`` is asked at each policy reload."""

    def __init__(self, *, policies: PolicyStore, profile: ProfileSource, metrics: Metrics, events: EventLogger,
                 available_scores: Callable[[], frozenset[str]]) -> None:
        self._policies = policies
        self._profile = profile
        self._metrics = metrics
        self._events = events
        self._available_scores = available_scores

    def policy(self, trigger: str) -> tuple[bool, str | None]:
        """Reload the policy (``trigger``: ``watch``, ``sighup``, ``admin`` or ``profile``, for the log):
        (accepted, the error when it was rejected)."""
        result = self._policies.reload(available_scores=self._available_scores())
        self._metrics.policy_reloads.labels("ok" if result.ok else "failed").inc()
        if result.ok:
            if result.changed:
                self._metrics.policy_info.clear()
                self._metrics.policy_info.labels(result.revision).set(1)
                self._events.log("info", "policy reloaded", guard={"policy_revision": result.revision,
                                                                   "trigger": trigger,
                                                                   "warnings": list(result.warnings)})
            return True, None
        self._events.log("error", "policy rejected, the last good policy stays active",
                         ecs_event={"outcome": "failure"},
                         guard={"policy_revision": result.revision, "trigger": trigger},
                         error={"message": result.error})
        return False, result.error

    def profile(self) -> None:
        """Reload the profile when one of its files changed, then the policy (its scores may have changed)."""
        if not self._profile.changed_on_disk():
            return
        before = self._profile.revision
        try:
            self._profile.reload()
        except (ProfileError, OSError, ValueError) as exc:
            self._metrics.profile_reloads.labels("failed").inc()
            self._events.log("error", "profile rejected, the last good profile stays active",
                             ecs_event={"outcome": "failure"}, guard={"profile_revision": before},
                             error={"message": str(exc)})
            return
        self._metrics.profile_reloads.labels("ok").inc()
        self._events.log("info", "profile reloaded", guard={"profile_revision": self._profile.revision,
                                                            "previous_revision": before})
        self.policy("profile")

    def watch(self) -> None:
        """One tick of the file watcher: whichever of the two files changed is reloaded."""
        if self._policies.changed_on_disk():
            self.policy("watch")
        self.profile()
