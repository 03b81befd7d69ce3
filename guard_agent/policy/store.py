"""The policy store: validate, then swap one immutable policy; keep the last good one.

Reload triggers (the watcher task, SIGHUP, ``POST /admin/reload``) all call
``reload()``. Checks that need more than the file (e.g. the route table: a policy that
could harden answers on a route whose protocol cannot be hardened) are added with
``add_check`` and run before a reload activates a different policy, like the file's own
validation: a check may refuse the policy (``PolicyError``) or only log about it, and a
reload that yields the active policy again does not repeat it.

The watcher polls the resolved target of the policy path, so a Kubernetes
ConfigMap update (an atomic swap of the ``..data`` symlink) is seen as a change
of the file's identity (device, inode, size, mtime) even though the path is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from guard_agent.filewatch import file_identity
from guard_agent.policy.loader import LoadedPolicy, PolicyError, load_policy_file, parse_policy, resolve_policy_path
from guard_agent.policy.model import BUILTIN_SCORES, Policy

__all__ = ["PolicyCheck", "PolicyStore", "ReloadResult", "default_policy_text"]

PolicyCheck = Callable[[Policy], None]
"""Looks at a compiled policy about to become active in this guard: raises ``PolicyError`` to refuse it, or
returns (after logging a warning, for a policy that is accepted but deserves one)."""

DEFAULT_POLICY_SOURCE = "<built-in default policy>"


def default_policy_text() -> str:
    """The policy shipped inside the package (identical to examples/policy.yaml)."""
    return resources.files("guard_agent").joinpath("default_policy.yaml").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    changed: bool
    revision: str
    error: str | None = None
    warnings: tuple[str, ...] = ()


class PolicyStore:
    """Holds the active policy; ``current`` is read on every request (one attribute read)."""

    def __init__(self, path: str | None, *, available_scores: frozenset[str] = BUILTIN_SCORES,
                 on_result: Callable[[ReloadResult], None] | None = None) -> None:
        self.path = path
        self.available_scores = available_scores
        self._on_result = on_result
        self._identity: tuple[int, int, int, int] | None = None
        self._text: str | None = None
        self._checks: list[PolicyCheck] = []
        loaded = self._load()  # the first load must succeed: raise PolicyError otherwise
        self.current: Policy = loaded.policy
        self.warnings = loaded.warnings

    def add_check(self, check: PolicyCheck) -> None:
        """Apply ``check`` to the active policy now (a PolicyError propagates: the caller refuses to start) and
        to each policy a later reload would activate (a PolicyError rejects it and the last good one stays).

        Runs once per change of the compiled policy (revision or available scores), not on every reload of
        the same one, so a check that only logs a warning says it once per policy activated.
        """
        check(self.current)
        self._checks.append(check)

    def _load(self) -> LoadedPolicy:
        if self.path is None:
            self._text = default_policy_text()
            loaded = parse_policy(self._text, source=DEFAULT_POLICY_SOURCE, available_scores=self.available_scores)
        else:
            target = resolve_policy_path(self.path)
            self._identity = file_identity(target)
            loaded = load_policy_file(target, available_scores=self.available_scores)
        return loaded

    def changed_on_disk(self) -> bool:
        """Cheap check for the watcher: has the file behind the path changed identity?"""
        if self.path is None:
            return False
        return file_identity(resolve_policy_path(self.path)) != self._identity

    def reload(self, *, available_scores: frozenset[str] | None = None) -> ReloadResult:
        """Validate the file again and swap it in; on any error keep the current policy."""
        if available_scores is not None:
            self.available_scores = available_scores
        try:
            loaded = self._load()
            changed = (loaded.policy.revision != self.current.revision
                       or loaded.policy.default.score_names != self.current.default.score_names)
            if changed:  # the active policy has passed the checks already
                for check in self._checks:
                    check(loaded.policy)
        except PolicyError as exc:
            result = ReloadResult(ok=False, changed=False, revision=self.current.revision, error=str(exc))
        else:
            self.current = loaded.policy
            self.warnings = loaded.warnings
            result = ReloadResult(ok=True, changed=changed, revision=loaded.policy.revision,
                                  warnings=loaded.warnings)
        if self._on_result is not None:
            self._on_result(result)
        return result
