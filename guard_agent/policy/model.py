"""The compiled, immutable policy and the decision it produces.

A policy file is parsed and validated once (``loader.py``) into these frozen
objects; ``decide()`` (``decide.py``) only reads them. Per-model overrides are
resolved at load time into one ``EffectivePolicy`` per model, so the request
path does a dict lookup and nothing else.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["allow", "flag", "harden", "throttle", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "flag", "harden", "throttle", "block")
SEVERITY: Mapping[str, int] = {a: i for i, a in enumerate(ACTIONS)}

SCORE_NAMES: frozenset[str] = frozenset({
    "input.schema", "ood.mahalanobis", "ood.knn", "ood.pca", "ood.iforest", "ood.combined", "adv.squeeze",
    "session.prada", "session.fingerprint", "session.global_fingerprint", "session.neighbors",
    "session.coverage", "session.margin", "session.rate", "session.risk", "session.crawl",
    "integrity.canary", "text.invisible", "text.control", "text.confusable", "text.length",
})
"""The policy's score vocabulary (DESIGN.md). Every score is on a [0, 1] scale, higher = more anomalous."""

PROPERTY_NAMES: frozenset[str] = frozenset({
    "request.rows", "request.body_bytes", "request.model", "request.protocol", "request.features",
    "session.queries", "session.age_seconds", "session.source",
    # OpenAI-compatible routes only (0 / false elsewhere): guard_agent/llm/_request.py
    "request.stream", "request.logprobs", "request.top_logprobs", "request.logit_bias", "request.logit_bias_max",
    "request.max_tokens", "session.tokens", "session.logit_bias_tokens", "session.logprob_requests",
})
"""Request and session properties a rule may test besides scores."""

BUILTIN_SCORES: frozenset[str] = frozenset({"input.schema", "text.invisible", "text.control", "text.confusable",
                                            "text.length"})
"""Scores the guard computes without a detector profile."""

TECHNIQUE_BY_PREFIX: Mapping[str, str] = {
    "ood.": "AML.T0015",
    "input.": "AML.T0015",
    "adv.": "AML.T0015",
    "text.": "AML.T0015",
    "session.prada": "AML.T0024.002",
    "session.coverage": "AML.T0024.002",
    "session.margin": "AML.T0024.002",
    "session.rate": "AML.T0024.002",
    "session.risk": "AML.T0024.002",
    "session.crawl": "AML.T0024.002",
    "session.fingerprint": "AML.T0043.001",
    "session.global_fingerprint": "AML.T0043.001",
    "session.neighbors": "AML.T0043.001",
    "integrity.": "AML.T0018",
}
"""MITRE ATLAS technique implied by the first score a rule tests, unless the rule names one."""

OPERATORS: Mapping[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le,
    "eq": operator.eq, "ne": operator.ne, "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b,
}


@dataclass(frozen=True)
class Condition:
    """One test: ``fact <op> value``. A fact missing from the request never matches."""

    fact: str
    op: str
    value: Any

    def holds(self, facts: Mapping[str, Any]) -> bool:
        got = facts.get(self.fact)
        if got is None:
            return False
        try:
            return bool(OPERATORS[self.op](got, self.value))
        except TypeError:
            return False


@dataclass(frozen=True)
class Rule:
    """All conditions must hold for the rule to match."""

    id: str
    action: Action
    conditions: tuple[Condition, ...]
    technique: str | None = None
    description: str = ""
    cooldown: float | None = None   # seconds a block by this rule keeps the session blocked; None = policy default

    def matches(self, facts: Mapping[str, Any]) -> bool:
        """Every condition holds."""
        for condition in self.conditions:  # noqa: SIM110 - all() over a generator costs more than the tests
            if not condition.holds(facts):
                return False
        return True


@dataclass(frozen=True)
class RateLimit:
    """Token bucket per session: ``rate`` requests per second, bursts up to ``burst``."""

    rate: float
    burst: float


@dataclass(frozen=True)
class Hardening:
    """How a ``harden`` decision degrades the answer."""

    round_digits: int | None = 2
    top_k: int | None = None
    label_only: bool = False


QUERY_CHOICES: tuple[str, ...] = ("refuse", "strip", "forward")
"""What ``input.query`` may say about a query string on a scored route."""


@dataclass(frozen=True)
class InputSchema:
    """Declared input checks: what a request must look like before any detector runs."""

    features: int | None = None
    minimum: tuple[float, ...] | None = None
    maximum: tuple[float, ...] | None = None
    allow_nonfinite: bool = False
    max_rows: int | None = None
    # a query string on a scored route: refuse (400), strip (forward the path alone) or forward it as sent;
    # no inference protocol the guard parses uses one, and the model server may read it (``?/../unload``)
    query: str = "refuse"


@dataclass(frozen=True)
class Lists:
    """Allow/deny lists, checked before any rule: allow short-circuits to allow, deny to block."""

    allow_sessions: frozenset[str] = frozenset()
    deny_sessions: frozenset[str] = frozenset()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class Failure:
    """What to do when scoring raises or overruns its budget: ``open`` allows, ``closed`` blocks."""

    on_error: Literal["open", "closed"] = "open"
    on_budget: Literal["open", "closed"] = "open"
    budget_ms: float = 50.0


@dataclass(frozen=True)
class SqueezeSettings:
    """Feature squeezing is opt-in per model: it costs extra model calls."""

    enabled: bool = False
    kind: Literal["auto", "image", "tabular"] = "auto"
    bit_depth: int = 4


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy as it applies to one model, overrides already merged."""

    mode: Literal["enforce", "monitor"]
    rules: tuple[Rule, ...]
    rate_limit: RateLimit | None
    hardening: Hardening
    input: InputSchema
    lists: Lists
    failure: Failure
    block_cooldown: float
    squeeze: SqueezeSettings
    score_names: frozenset[str]
    require_credentials: bool = False
    health_requires_credentials: bool = False
    """Top level only: with ``require_credentials``, plain health routes need credentials too (default: open)."""
    integrity_action: Literal["monitor", "flag", "block"] = "monitor"

    needs_session_scores: bool = field(init=False, default=False)
    """True when a rule reads a session.* score: only then do the session trackers run (derived)."""

    def credentials_required(self, *, health: bool = False) -> bool:
        """Whether a request needs valid credentials: every route when ``require_credentials``, except plain
        health routes (load-balancer and probe targets), which stay open unless ``health_requires_credentials``."""
        return self.require_credentials and (not health or self.health_requires_credentials)

    def __post_init__(self) -> None:
        needed = any(c.fact.startswith("session.") and c.fact in SCORE_NAMES
                     for rule in self.rules for c in rule.conditions)
        object.__setattr__(self, "needs_session_scores", needed)


@dataclass(frozen=True)
class Policy:
    """A validated policy: the default view plus per-model views, stamped with its revision."""

    revision: str
    source: str
    default: EffectivePolicy
    models: Mapping[str, EffectivePolicy] = field(default_factory=dict)
    skipped_rules: tuple[str, ...] = ()
    document: Mapping[str, Any] = field(default_factory=dict)

    def for_model(self, model: str | None) -> EffectivePolicy:
        if model is None:
            return self.default
        return self.models.get(model, self.default)


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one request (pure data; the proxy acts on it)."""

    action: Action
    rule: str
    matched: tuple[str, ...] = ()
    technique: str | None = None
    enforced: bool = True
    hardening: Hardening | None = None
    retry_after: float | None = None
    reason: str = ""
    cooldown: float | None = None   # the winning rule's own block cool-down, when it sets one
    unhardenable: bool = False      # a harden turned into a block: the route's answers cannot be hardened

    @property
    def refused(self) -> bool:
        """True when the request must not reach the model."""
        return self.enforced and self.action in ("block", "throttle")
