"""Parse and validate a policy file into an immutable ``Policy``.

Validation is strict (unknown keys, wrong types, duplicate YAML keys and
unknown actions or facts are errors) and every error names the file, the line
and the field, so that ``guard-agent check`` and the reload log point straight
at the mistake. A rule that names a score the loaded profile does not provide
is not an error: it is skipped and reported, so the shipped policy loads with
or without a profile.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from guard_agent.policy.model import (
    ACTIONS,
    OPERATORS,
    PROPERTY_NAMES,
    QUERY_CHOICES,
    SCORE_NAMES,
    TECHNIQUE_BY_PREFIX,
    Condition,
    EffectivePolicy,
    Failure,
    Hardening,
    InputSchema,
    Lists,
    Policy,
    RateLimit,
    Rule,
    SqueezeSettings,
)

__all__ = ["LoadedPolicy", "PolicyError", "load_policy_file", "parse_policy", "resolve_policy_path"]

Path_ = tuple[str | int, ...]


class PolicyError(ValueError):
    """A policy that must not be activated; ``str()`` reads ``file:line: field: message``."""

    def __init__(self, source: str, line: int | None, field: str, message: str) -> None:
        self.source, self.line, self.field, self.message = source, line, field, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {field or '<top>'}: {message}" if field else f"{where}: {message}")


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    warnings: tuple[str, ...]


def resolve_policy_path(path: str | Path) -> Path:
    """A file, or a directory holding ``policy.yaml`` (a mounted ConfigMap)."""
    p = Path(path)
    return p / "policy.yaml" if p.is_dir() else p


def _fmt(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Doc:
    """A YAML document as plain data plus a line number for every path in it."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines: dict[Path_, int] = {}
        self._constructor = yaml.SafeLoader("")
        self._seen: set[int] = set()
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = _error_mark(exc)
            raise PolicyError(source, mark.line + 1 if mark else None, "",
                              f"invalid YAML: {exc.problem or exc}") from exc
        except yaml.YAMLError as exc:
            raise PolicyError(source, None, "", f"invalid YAML: {exc}") from exc
        if node is None:
            raise PolicyError(source, 1, "", "the file is empty")
        self.data = self._build(node, ())

    def _build(self, node: yaml.Node, path: Path_) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if id(node) in self._seen:  # an alias: refuse, so a small file cannot expand exponentially
            raise self.error(path, "YAML anchors and aliases are not supported in policies")
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.error(path, "mapping keys must be plain strings")
                if key in out:
                    self.lines[(*path, key)] = key_node.start_mark.line + 1
                    raise self.error((*path, key), "duplicate key")
                out[key] = self._build(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(v, (*path, i)) for i, v in enumerate(node.value)]
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. an unknown tag, or '=' which PyYAML resolves to a value tag
            raise self.error(path, f"unsupported YAML value: {getattr(exc, 'problem', exc)}") from exc

    def error(self, path: Path_, message: str) -> PolicyError:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        return PolicyError(self.source, self.lines.get(probe), _fmt(path), message)


def _error_mark(exc: yaml.MarkedYAMLError) -> Any:
    """Where the mistake is. PyYAML notices an unclosed quote or flow mapping, or a key without its ':', only
    lines later (``problem_mark``); the construct that was left open (``context_mark``) is the line to fix."""
    context = exc.context or ""
    if exc.context_mark is not None and context.startswith(("while scanning", "while parsing a flow")):
        return exc.context_mark
    return exc.problem_mark or exc.context_mark


class _Reader:
    """Typed accessors that raise ``PolicyError`` at the right line."""

    def __init__(self, doc: _Doc) -> None:
        self.doc = doc

    def mapping(self, value: Any, path: Path_, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.doc.error(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.doc.error((*path, key), f"unknown field (expected one of: {', '.join(sorted(allowed))})")
        return value

    def number(self, value: Any, path: Path_, *, minimum: float | None = None, integer: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.doc.error(path, f"expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise self.doc.error(path, f"expected a finite number, got {value!r}")
        if integer and not isinstance(value, int):
            raise self.doc.error(path, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.doc.error(path, f"must be >= {minimum}, got {value!r}")
        return float(value)

    def boolean(self, value: Any, path: Path_) -> bool:
        if not isinstance(value, bool):
            raise self.doc.error(path, f"expected true or false, got {value!r}")
        return value

    def choice(self, value: Any, path: Path_, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.doc.error(path, f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    def strings(self, value: Any, path: Path_) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.doc.error(path, "expected a list of strings")
        return list(value)


_SECTION_KEYS = {"mode", "input", "rate_limit", "hardening", "lists", "failure", "block", "squeeze", "rules",
                 "access", "integrity"}
_TOP_KEYS = _SECTION_KEYS | {"version", "models", "description"}


def parse_policy(text: str, *, source: str = "<policy>",
                 available_scores: frozenset[str] | None = None) -> LoadedPolicy:
    """Validate ``text`` and compile it; ``available_scores`` = what the guard can compute now."""
    doc = _Doc(text, source)
    r = _Reader(doc)
    top = r.mapping(doc.data, (), _TOP_KEYS)
    if top.get("version") != 1:
        raise doc.error(("version",), f"unsupported policy version {top.get('version')!r} (expected 1)")
    available = SCORE_NAMES if available_scores is None else available_scores
    warnings: list[str] = []
    base = _compile_section(r, top, (), None, available, warnings)
    models: dict[str, EffectivePolicy] = {}
    raw_models = top.get("models")
    allowed_models = set(raw_models) if isinstance(raw_models, dict) else set()
    for name, override in r.mapping(raw_models, ("models",), allowed_models).items():
        section = r.mapping(override, ("models", name), _SECTION_KEYS | {"disable_rules"})
        models[name] = _compile_section(r, section, ("models", name), base, available, warnings)
    revision = hashlib.sha256(text.encode()).hexdigest()
    policy = Policy(revision=revision, source=source, default=base, models=models,
                    skipped_rules=tuple(w.split("'")[1] for w in warnings if w.startswith("rule '")),
                    document=top)
    return LoadedPolicy(policy, tuple(warnings))


def load_policy_file(path: str | Path, *, available_scores: frozenset[str] | None = None) -> LoadedPolicy:
    """Read and compile a policy file (or a directory holding ``policy.yaml``)."""
    target = resolve_policy_path(path)
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise PolicyError(str(target), None, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(target), None, "", "not UTF-8 text") from exc
    return parse_policy(text, source=str(target), available_scores=available_scores)


def _compile_section(r: _Reader, sec: Mapping[str, Any], path: Path_, base: EffectivePolicy | None,
                     available: frozenset[str], warnings: list[str]) -> EffectivePolicy:
    def sub(key: str) -> Path_:
        return (*path, key)

    mode = r.choice(sec["mode"], sub("mode"), ("enforce", "monitor")) if "mode" in sec else \
        (base.mode if base else "enforce")
    rules = list(base.rules) if base else []
    if "disable_rules" in sec:
        drop = set(r.strings(sec["disable_rules"], sub("disable_rules")))
        rules = [rule for rule in rules if rule.id not in drop]
    seen = {rule.id for rule in rules}
    raw_rules = sec.get("rules") or []
    if not isinstance(raw_rules, list):
        raise r.doc.error(sub("rules"), "expected a list of rules")
    for i, raw in enumerate(raw_rules):
        rule = _compile_rule(r, raw, (*sub("rules"), i))
        if rule.id in seen:
            raise r.doc.error((*sub("rules"), i, "id"), f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        missing = sorted({c.fact for c in rule.conditions if c.fact in SCORE_NAMES} - available)
        if missing:
            warnings.append(f"rule '{rule.id}' skipped: the loaded profile does not provide {', '.join(missing)}")
            continue
        rules.append(rule)
    return EffectivePolicy(
        mode=mode,  # type: ignore[arg-type]
        rules=tuple(rules),
        rate_limit=_rate_limit(r, sec, sub, base),
        hardening=_hardening(r, sec, sub, base),
        input=_input(r, sec, sub, base),
        lists=_lists(r, sec, sub, base),
        failure=_failure(r, sec, sub, base),
        block_cooldown=_cooldown(r, sec, sub, base),
        squeeze=_squeeze(r, sec, sub, base),
        score_names=available,
        require_credentials=_access(r, sec, sub, base),
        health_requires_credentials=_health_access(r, sec, sub, base),
        integrity_action=_integrity(r, sec, sub, base),  # type: ignore[arg-type]
    )


def _compile_rule(r: _Reader, raw: Any, path: Path_) -> Rule:
    m = r.mapping(raw, path, {"id", "action", "when", "technique", "description", "cooldown_seconds"})
    rid = m.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise r.doc.error((*path, "id"), "every rule needs a non-empty string id")
    action = r.choice(m.get("action"), (*path, "action"), ACTIONS)
    when = m.get("when")
    if not isinstance(when, dict) or not when:
        raise r.doc.error((*path, "when"), "expected a non-empty mapping of fact -> {operator: value}")
    conditions: list[Condition] = []
    for fact, test in when.items():
        fpath = (*path, "when", fact)
        if fact not in SCORE_NAMES and fact not in PROPERTY_NAMES:
            raise r.doc.error(fpath, f"unknown score or property {fact!r}")
        if not isinstance(test, dict) or not test:
            raise r.doc.error(fpath, "expected {operator: value}, e.g. {gte: 0.99}")
        for op, value in test.items():
            if op not in OPERATORS:
                raise r.doc.error((*fpath, op), f"unknown operator (expected one of: {', '.join(OPERATORS)})")
            if op in ("in", "not_in"):
                if not isinstance(value, list):
                    raise r.doc.error((*fpath, op), "expected a list")
                value = frozenset(value)
            elif fact in SCORE_NAMES:
                # every score lies in [0, 1]: a threshold outside it fires on everything (gte: -1 blocks every
                # client) or on nothing (gte: 95 silently disables the rule), so it is a mistake, never a policy
                value = _unit_threshold(r, value, (*fpath, op))
            elif fact in ("request.rows", "request.body_bytes", "request.features",
                                                 "session.queries", "session.age_seconds"):
                value = r.number(value, (*fpath, op))
            conditions.append(Condition(fact, op, value))
    technique = m.get("technique")
    if technique is not None and not isinstance(technique, str):
        raise r.doc.error((*path, "technique"), "expected a MITRE ATLAS technique id such as AML.T0015")
    if technique is None:
        technique = _implied_technique(conditions)
    description = m.get("description", "")
    cooldown = m.get("cooldown_seconds")
    if cooldown is not None:
        cooldown = r.number(cooldown, (*path, "cooldown_seconds"), minimum=0)
    return Rule(id=rid, action=action, conditions=tuple(conditions), technique=technique,  # type: ignore[arg-type]
                description=str(description), cooldown=cooldown)


def _unit_threshold(r: _Reader, value: Any, path: Path_) -> float:
    number = r.number(value, path)
    if not 0.0 <= number <= 1.0:
        raise r.doc.error(path, f"scores lie in [0, 1] (1 - p-value, e.g. 0.999), got {value!r}")
    return number


def _implied_technique(conditions: list[Condition]) -> str | None:
    for c in conditions:
        for prefix, technique in TECHNIQUE_BY_PREFIX.items():
            if c.fact.startswith(prefix):
                return technique
    return None


def _rate_limit(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> RateLimit | None:
    if "rate_limit" not in sec:
        return base.rate_limit if base else None
    raw = sec["rate_limit"]
    if raw is None or raw is False:
        return None
    m = r.mapping(raw, sub("rate_limit"), {"requests_per_second", "burst"})
    rate = r.number(m.get("requests_per_second"), (*sub("rate_limit"), "requests_per_second"), minimum=0.001)
    burst = r.number(m.get("burst", max(1.0, rate)), (*sub("rate_limit"), "burst"), minimum=1)
    return RateLimit(rate=rate, burst=burst)


def _hardening(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> Hardening:
    if "hardening" not in sec:
        return base.hardening if base else Hardening()
    m = r.mapping(sec["hardening"], sub("hardening"), {"round_digits", "top_k", "label_only"})
    p = sub("hardening")
    digits = m.get("round_digits")
    top_k = m.get("top_k")
    return Hardening(
        round_digits=None if digits is None else int(r.number(digits, (*p, "round_digits"), minimum=0, integer=True)),
        top_k=None if top_k is None else int(r.number(top_k, (*p, "top_k"), minimum=1, integer=True)),
        label_only=r.boolean(m.get("label_only", False), (*p, "label_only")),
    )


def _bounds(r: _Reader, value: Any, path: Path_) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return tuple(r.number(v, (*path, i)) for i, v in enumerate(value))
    return (r.number(value, path),)


def _input(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> InputSchema:
    if "input" not in sec:
        return base.input if base else InputSchema()
    p = sub("input")
    m = r.mapping(sec["input"], p, {"features", "min", "max", "allow_nonfinite", "max_rows", "query"})
    features = m.get("features")
    max_rows = m.get("max_rows")
    schema = InputSchema(
        features=None if features is None else int(r.number(features, (*p, "features"), minimum=1, integer=True)),
        minimum=_bounds(r, m.get("min"), (*p, "min")),
        maximum=_bounds(r, m.get("max"), (*p, "max")),
        allow_nonfinite=r.boolean(m.get("allow_nonfinite", False), (*p, "allow_nonfinite")),
        max_rows=None if max_rows is None else int(r.number(max_rows, (*p, "max_rows"), minimum=1, integer=True)),
        query=r.choice(m.get("query", "refuse"), (*p, "query"), QUERY_CHOICES),
    )
    for key, bound in (("min", schema.minimum), ("max", schema.maximum)):
        if bound and len(bound) > 1 and schema.features is not None and len(bound) != schema.features:
            raise r.doc.error((*p, key), f"has {len(bound)} values but features is {schema.features}")
    return schema


def _lists(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> Lists:
    if "lists" not in sec:
        return base.lists if base else Lists()
    p = sub("lists")
    m = r.mapping(sec["lists"], p, {"allow_sessions", "deny_sessions", "allow_cidrs", "deny_cidrs"})

    def nets(key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        out = []
        for i, cidr in enumerate(r.strings(m.get(key), (*p, key))):
            try:
                out.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise r.doc.error((*p, key, i), str(exc)) from exc
        return tuple(out)

    return Lists(
        allow_sessions=frozenset(r.strings(m.get("allow_sessions"), (*p, "allow_sessions"))),
        deny_sessions=frozenset(r.strings(m.get("deny_sessions"), (*p, "deny_sessions"))),
        allow_networks=nets("allow_cidrs"),
        deny_networks=nets("deny_cidrs"),
    )


def _failure(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> Failure:
    if "failure" not in sec:
        return base.failure if base else Failure()
    p = sub("failure")
    m = r.mapping(sec["failure"], p, {"on_error", "on_budget", "budget_ms"})
    return Failure(
        on_error=r.choice(m.get("on_error", "open"), (*p, "on_error"), ("open", "closed")),  # type: ignore[arg-type]
        on_budget=r.choice(m.get("on_budget", "open"), (*p, "on_budget"), ("open", "closed")),  # type: ignore[arg-type]
        budget_ms=r.number(m.get("budget_ms", 50), (*p, "budget_ms"), minimum=0.1),
    )


def _cooldown(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> float:
    if "block" not in sec:
        return base.block_cooldown if base else 0.0
    m = r.mapping(sec["block"], sub("block"), {"cooldown_seconds"})
    return r.number(m.get("cooldown_seconds", 0), (*sub("block"), "cooldown_seconds"), minimum=0)


def _squeeze(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> SqueezeSettings:
    if "squeeze" not in sec:
        return base.squeeze if base else SqueezeSettings()
    p = sub("squeeze")
    m = r.mapping(sec["squeeze"], p, {"enabled", "kind", "bit_depth"})
    return SqueezeSettings(
        enabled=r.boolean(m.get("enabled", False), (*p, "enabled")),
        kind=r.choice(m.get("kind", "auto"), (*p, "kind"), ("auto", "image", "tabular")),  # type: ignore[arg-type]
        bit_depth=int(r.number(m.get("bit_depth", 4), (*p, "bit_depth"), minimum=1, integer=True)),
    )


_ACCESS_KEYS = {"require_credentials", "health_requires_credentials"}


def _access(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> bool:
    if "access" not in sec:
        return base.require_credentials if base else False
    m = r.mapping(sec["access"], sub("access"), _ACCESS_KEYS)
    return r.boolean(m.get("require_credentials", False), (*sub("access"), "require_credentials"))


def _health_access(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> bool:
    """``access.health_requires_credentials``: top level only (health routes name no model), and only with
    ``require_credentials: true`` there (without it no route needs credentials, and the setting would mislead)."""
    m = sec.get("access")
    if not isinstance(m, Mapping) or "health_requires_credentials" not in m:
        return base.health_requires_credentials if base else False
    path = (*sub("access"), "health_requires_credentials")
    if base is not None:
        raise r.doc.error(path, "set only at the top level: health routes name no model, so a model's policy "
                                "cannot apply to them")
    value = r.boolean(m["health_requires_credentials"], path)
    if value and m.get("require_credentials") is not True:
        raise r.doc.error(path, "has no effect without access.require_credentials: true at the top level")
    return value


def _integrity(r: _Reader, sec: Mapping[str, Any], sub: Any, base: EffectivePolicy | None) -> str:
    if "integrity" not in sec:
        return base.integrity_action if base else "monitor"
    m = r.mapping(sec["integrity"], sub("integrity"), {"on_violation"})
    return r.choice(m.get("on_violation", "monitor"), (*sub("integrity"), "on_violation"),
                    ("monitor", "flag", "block"))
