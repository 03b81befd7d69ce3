"""Policy: the YAML contract, its validation, the pure ``decide()`` and the hot-reloading store."""

from guard_agent.policy.decide import RequestFacts, SessionFacts, decide, facts_for
from guard_agent.policy.loader import LoadedPolicy, PolicyError, load_policy_file, parse_policy, resolve_policy_path
from guard_agent.policy.model import (
    ACTIONS,
    BUILTIN_SCORES,
    PROPERTY_NAMES,
    SCORE_NAMES,
    SEVERITY,
    Action,
    Decision,
    EffectivePolicy,
    Hardening,
    Policy,
    Rule,
)
from guard_agent.policy.store import PolicyStore, ReloadResult, default_policy_text

__all__ = [
    "ACTIONS", "BUILTIN_SCORES", "PROPERTY_NAMES", "SCORE_NAMES", "SEVERITY", "Action", "Decision",
    "EffectivePolicy", "Hardening", "LoadedPolicy", "Policy", "PolicyError", "PolicyStore", "ReloadResult",
    "RequestFacts", "Rule", "SessionFacts", "decide", "default_policy_text", "facts_for", "load_policy_file",
    "parse_policy", "resolve_policy_path",
]
