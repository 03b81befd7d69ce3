"""Route table, default deny: which request targets are scored, passed through, refused or malformed.

The table is built once from settings; ``match`` costs one or two dict lookups and at most two
precompiled regular expressions per request.

Path rules (checked on the *raw*, undecoded path, after dropping the query string at the first ``?``):

* ``invalid`` (ambiguous, the caller answers 400): not starting with ``/``; longer than 2048
  characters; non-ASCII or control characters (NUL included); any ``%`` at all (percent-encoding is
  refused outright, so ``%2F``, ``%2e`` and ``%69nfer`` can never be read differently by the guard and
  the model server); ``\\``; ``;`` (path parameters, ``..;/`` tricks); ``#``; empty segments (``//``);
  ``.`` or ``..`` segments; and model or version names ``.``/``..``. Allowed path characters are the
  RFC 3986 ``pchar`` set without ``%`` and ``;``.
* Everything well formed that is not in the table is ``denied`` (403), including case variants
  (``/V2/...``), a trailing slash (``/v2/models/m/infer/``) and a wrong method on a known path.

Routes from config:

* ``CustomRoute``: exact path and method; scored with protocol ``custom`` and the route's JSON pointer.
  Custom routes take precedence over built-in routes. The guard cannot harden a custom route's answer
  (its shape is unknown): such a request is blocked instead, and ``check_policy`` names the rules that could
  decide ``harden`` there (the server logs it at start and on every reload).
* ``AllowedRoute``: exact path and method, passed through unscored. A final segment that is exactly
  ``*`` is a wildcard for exactly one further non-empty segment (``/v2/repository/models/*`` matches
  ``/v2/repository/models/m`` but neither ``/v2/repository/models/m/load`` nor
  ``/v2/repository/models/``). ``HEAD`` is not implied by ``GET``: list it if needed.
  Built-in routes take precedence over allowed routes for the methods they define.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from guard_agent.policy.loader import PolicyError
from guard_agent.policy.model import Policy
from guard_agent.protocols import HARDENABLE_PROTOCOLS
from guard_agent.settings import AllowedRoute, ConfigError, CustomRoute

__all__ = ["MAX_PATH_LENGTH", "RouteMatch", "RouteTable", "check_path"]

MAX_PATH_LENGTH = 2048
_MATCH_CACHE_ENTRIES = 1024  # (method, path) -> RouteMatch; paths are at most MAX_PATH_LENGTH: at most ~2 MB

Kind = Literal["inference", "passthrough", "denied", "invalid"]


@dataclass(frozen=True)
class RouteMatch:
    """What the table says about one request target."""

    kind: Kind
    protocol: str | None
    model: str | None
    version: str | None
    pointer: str | None
    route: str
    reason: str
    health: bool = False
    """A plain health route (``GET /v2``, ``/v2/health/*``, ``/ping``, ``/health``): it names no model, so probes
    reach it without credentials unless the policy's ``access.health_requires_credentials`` says otherwise.
    Model metadata (``/v2/models/{m}[/ready]``, ``/v1/models/{m}``) is not health: it needs credentials whenever
    that model's policy requires them."""


# RFC 3986 pchar minus "%" (no percent-encoding at all) and ";" (path parameters).
# A segment is never "." or ".." (the lookahead), so one fullmatch checks characters, "//" and dots.
_SEG = r"(?!\.\.?(?:/|$))[A-Za-z0-9._~!$&'()*+,=:@-]+"
_SHAPE = re.compile(rf"/(?:{_SEG}(?:/{_SEG})*/?)?")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|$)")
_NAME = r"[A-Za-z0-9_.-]{1,128}"
_MODEL_PATH = re.compile(
    rf"/v(?P<api>[12])/models/(?P<m>{_NAME})(?:/versions/(?P<v>{_NAME}))?"
    r"(?P<tail>/infer|/ready|/metadata|:predict)?"
)
_READ = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})

# (api, tail) -> (kind, protocol, methods, route label)
_MODEL_ROUTES: dict[tuple[str, str], tuple[Kind, str | None, frozenset[str], str]] = {
    ("2", "/infer"): ("inference", "v2", _POST, "v2.infer"),
    ("2", ""): ("passthrough", None, _READ, "v2.model_metadata"),
    ("2", "/ready"): ("passthrough", None, _READ, "v2.model_ready"),
    ("1", ":predict"): ("inference", "v1", _POST, "v1.predict"),
    ("1", ""): ("passthrough", None, _READ, "v1.model_status"),
    ("1", "/metadata"): ("passthrough", None, _READ, "v1.model_metadata"),
}

# exact path -> (kind, protocol, methods, route label)
_STATIC_ROUTES: dict[str, tuple[Kind, str | None, frozenset[str], str]] = {
    "/v2": ("passthrough", None, _READ, "v2.server_metadata"),
    "/v2/health/live": ("passthrough", None, _READ, "v2.health"),
    "/v2/health/ready": ("passthrough", None, _READ, "v2.health"),
    "/invocations": ("inference", "mlflow", _POST, "mlflow.invocations"),
    "/ping": ("passthrough", None, _READ, "mlflow.ping"),
    "/health": ("passthrough", None, _READ, "health"),
    # OpenAI-compatible LLM servers (vLLM, llama.cpp, KServe's OpenAI runtime): guard_agent/llm, docs/text.md
    "/v1/chat/completions": ("inference", "openai.chat", _POST, "openai.chat"),
    "/v1/completions": ("inference", "openai.completions", _POST, "openai.completions"),
    "/v1/embeddings": ("inference", "openai.embeddings", _POST, "openai.embeddings"),
    "/v1/models": ("passthrough", None, _READ, "openai.models"),
}


def _invalid(reason: str) -> RouteMatch:
    return RouteMatch("invalid", None, None, None, None, "invalid", reason)


def _denied(reason: str) -> RouteMatch:
    return RouteMatch("denied", None, None, None, None, "denied", reason)


_NOT_ALLOWED = _denied("route not allowed")
_BAD_METHOD = _denied("method not allowed for this route")


def _diagnose(path: str) -> str:
    """Say why a path failed the shape check; only runs on the slow (refused) path."""
    if not path.startswith("/"):
        return "request target must be an absolute path"
    if not path.isascii():
        return "non-ASCII characters in path"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "control characters in path"
    if "%" in path:
        return "percent-encoding in path is refused"
    if "\\" in path:
        return "backslash in path"
    if ";" in path:
        return "';' path parameters are refused"
    if "//" in path:
        return "empty path segment ('//')"
    if _DOT_SEGMENT.search(path) is not None:
        return "'.' or '..' path segment"
    return "characters not allowed in path"


def check_path(path: str) -> str | None:
    """Return why ``path`` (query already removed) is ambiguous, or None when it is well formed."""
    if len(path) > MAX_PATH_LENGTH:
        return f"path longer than {MAX_PATH_LENGTH} characters"
    if _SHAPE.fullmatch(path) is None:
        return _diagnose(path)
    return None


class RouteTable:
    """Immutable route table built once at start; ``match`` is the per-request entry point."""

    def __init__(self, custom: Sequence[CustomRoute] = (), allowed: Sequence[AllowedRoute] = ()) -> None:
        exact: dict[tuple[str, str], RouteMatch] = {}
        known: set[str] = set()
        wildcard: dict[tuple[str, str], RouteMatch] = {}
        for a in allowed:
            method = a.method.upper()
            if a.path.endswith("/*"):
                parent = a.path[:-1]
                self._check_config_path(parent + "x", "allow_routes")
                wildcard[(method, parent)] = RouteMatch(
                    "passthrough", None, None, None, None, f"allowed:{a.path}", "allowed by config")
            else:
                self._check_config_path(a.path, "allow_routes")
                if self._is_builtin(method, a.path):
                    raise ConfigError(f"allow_routes: {a.method} {a.path} is a built-in route; "
                                      "allowing it would bypass or duplicate the built-in handling")
                exact[(method, a.path)] = RouteMatch(
                    "passthrough", None, None, None, None, f"allowed:{a.path}", "allowed by config")
                known.add(a.path)
        for path, (kind, protocol, methods, label) in _STATIC_ROUTES.items():
            for method in methods:
                exact[(method, path)] = RouteMatch(kind, protocol, None, None, None, label, "built-in route",
                                                   health=kind == "passthrough")
            known.add(path)
        for c in custom:
            self._check_config_path(c.path, "routes")
            if not c.pointer.startswith("/"):
                raise ConfigError(f"routes: pointer must start with '/': {c.pointer!r}")
            exact[(c.method.upper(), c.path)] = RouteMatch(
                "inference", "custom", c.model, None, c.pointer, f"custom:{c.path}", "custom route")
            known.add(c.path)
        self._exact = exact
        self._known = frozenset(known)
        self._wildcard = wildcard
        self._matches: dict[tuple[str, str], RouteMatch] = {}

    def check_policy(self, policy: Policy) -> None:
        """Raise PolicyError when an enforced rule could answer ``harden`` on a route whose answers cannot be
        hardened (such requests are blocked instead; the server logs this error as a warning)."""
        for (method, path), route in sorted(self._exact.items()):
            if route.kind != "inference" or route.protocol in HARDENABLE_PROTOCOLS:
                continue
            eff = policy.for_model(route.model)
            hardening = [rule.id for rule in eff.rules if rule.action == "harden"]
            if eff.mode != "enforce" or not hardening:
                continue
            overridden = route.model is not None and route.model in policy.models
            where = f"models.{route.model}.rules" if overridden else "rules"
            model = f"model {route.model!r}" if route.model else "no model"
            raise PolicyError(
                policy.source, None, where,
                f"rule(s) {', '.join(map(repr, hardening))} may answer 'harden', but the custom route "
                f"{method} {path} ({model}) has protocol {route.protocol!r}, whose answers the guard cannot harden "
                "(each such request is blocked): name a model on the route and disable those rules for it "
                "(models.<model>.disable_rules), or run that model in monitor mode")

    @staticmethod
    def _check_config_path(path: str, setting: str) -> None:
        problem = check_path(path)
        if problem is not None or (path.endswith("/") and path != "/"):
            raise ConfigError(f"{setting}: path {path!r} is not a plain absolute path: "
                              f"{problem or 'trailing slash'}")

    def match(self, method: str, raw_path: str) -> RouteMatch:
        """Classify one request; ``raw_path`` is the undecoded target, query string included or not.

        A pure function of (method, path): the answers for the last ``_MATCH_CACHE_ENTRIES`` distinct targets
        are kept (a client's traffic names a handful of paths; one sending ever new ones only keeps the cache
        full, which is emptied when it fills, so memory stays bounded)."""
        path = raw_path.partition("?")[0]
        key = (method, path)
        found = self._matches.get(key)
        if found is None:
            found = self._match(method, path)
            if len(self._matches) >= _MATCH_CACHE_ENTRIES:
                self._matches.clear()
            self._matches[key] = found
        return found

    def _match(self, method: str, path: str) -> RouteMatch:
        problem = check_path(path)
        if problem is not None:
            return _invalid(problem)
        hit = self._exact.get((method, path))
        if hit is not None:
            return hit
        builtin = self._builtin(method, path)
        if builtin is not None and builtin.kind != "denied":
            return builtin
        allowed = self._allowed_wildcard(method, path)
        if allowed is not None:
            return allowed
        if builtin is not None:
            return builtin
        return _BAD_METHOD if path in self._known else _NOT_ALLOWED

    @staticmethod
    def _is_builtin(method: str, path: str) -> bool:
        """True for any method on a built-in inference path, or a built-in method on a read-only path."""
        static = _STATIC_ROUTES.get(path)
        if static is not None:
            return static[0] == "inference" or method in static[2]
        m = _MODEL_PATH.fullmatch(path)
        spec = None if m is None else _MODEL_ROUTES.get((m.group("api"), m.group("tail") or ""))
        return spec is not None and (spec[0] == "inference" or method in spec[2])

    @staticmethod
    def _builtin(method: str, path: str) -> RouteMatch | None:
        """Match the parameterised built-in routes; None when the path is not one of them."""
        m = _MODEL_PATH.fullmatch(path)
        if m is None:
            return None
        model, version = m.group("m"), m.group("v")
        if model in (".", "..") or version in (".", ".."):
            return _invalid("'.' or '..' as a model or version name")
        spec = _MODEL_ROUTES.get((m.group("api"), m.group("tail") or ""))
        if spec is None:
            return None
        kind, protocol, methods, label = spec
        if method not in methods:
            return _BAD_METHOD
        return RouteMatch(kind, protocol, model, version, None, label, "built-in route")

    def _allowed_wildcard(self, method: str, path: str) -> RouteMatch | None:
        if not self._wildcard:
            return None
        parent, _, last = path.rpartition("/")
        if not last:
            return None
        return self._wildcard.get((method, parent + "/"))
