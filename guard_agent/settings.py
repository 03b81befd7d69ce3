"""Process settings: defaults < config file < ``GUARD_*`` environment < flags.

Every setting has an environment name ``GUARD_<NAME>`` (upper case of the field
name) and the same lower-case key in the YAML config file. Secrets can come from
``GUARD_<NAME>_FILE`` so that Kubernetes Secrets mount as files, never as
ConfigMap values. Errors about a file that may hold secrets never quote it (see
``yaml_error_summary``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["AllowedRoute", "ConfigError", "CustomRoute", "Settings", "decode_error_summary", "load_settings",
           "parse_hostport", "yaml_error_summary"]


class ConfigError(ValueError):
    """A setting is missing, malformed or contradicts another one."""


@dataclass(frozen=True)
class CustomRoute:
    """An inference route declared in config: the JSON pointer says where the input is."""

    path: str
    pointer: str
    method: str = "POST"
    model: str | None = None


@dataclass(frozen=True)
class AllowedRoute:
    """A route passed through unscored although the default table would refuse it."""

    path: str
    method: str = "GET"


@dataclass(frozen=True)
class Settings:
    """Everything the process needs to start; immutable once loaded."""

    listen: str = "0.0.0.0:8080"
    admin_listen: str = "0.0.0.0:9090"
    upstream: str = "http://127.0.0.1:8081"
    policy: str | None = None
    profile: str | None = None
    session_header: str = "X-API-Key"
    session_sources: tuple[str, ...] = ("header", "bearer", "address")
    trusted_proxies: tuple[str, ...] = ()
    hmac_key: str | None = None
    admin_token: str | None = None
    redis_url: str | None = None
    canaries: str | None = None
    canary_interval: float = 300.0
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_json_depth: int = 32
    max_batch_rows: int = 4096
    client_read_timeout: float = 15.0
    header_read_timeout: float = 10.0   # a client must send its request head within this (slowloris)
    max_connections: int = 1024         # open client connections on the guard port; more get 503
    upstream_pool_size: int = 256
    log_sample_allow: float = 1.0
    log_level: str = "info"          # minimum level of operational logs; decision events are always written
    session_max: int = 100_000
    session_ttl: float = 3600.0
    # the global near-duplicate index (one attack spread over many keys): how far back it looks, how many
    # distinct near-duplicate inputs from other sessions make a score of 0.5, and how many fingerprints it holds
    global_window: float = 600.0
    global_half_count: float = 8.0
    global_max_entries: int = 200_000
    routes: tuple[CustomRoute, ...] = ()
    allow_routes: tuple[AllowedRoute, ...] = ()
    reload_interval: float = 1.0
    shutdown_grace: float = 10.0
    workers: int = 1                    # guard processes on one port (SO_REUSEPORT); > 1 needs redis_url
    # access control and transport
    api_keys_file: str | None = None
    jwt_jwks_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_session_claim: str = "sub"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # SIEM delivery besides stdout: a list of sink mappings, validated by the sink module
    sinks: tuple[dict[str, Any], ...] = ()
    spool_dir: str | None = None
    # decision capture for replay and tuning
    capture_dir: str | None = None
    capture_max_bytes: int = 64 * 1024 * 1024
    capture_max_files: int = 10
    capture_key: str | None = None
    # model integrity
    model_dir: str | None = None
    model_public_key_file: str | None = None


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_SECRETS = ("hmac_key", "admin_token", "redis_url", "capture_key")
_TUPLE_OF_STR = ("session_sources", "trusted_proxies")


_SAFE_QUOTED = re.compile(r"'(\\?.|<[a-z ]+>)'|\"(\\?.|<[a-z ]+>)\"")  # one character ('\t') or a token: '<scalar>'


def _without_content(text: str) -> str:
    """A parser message cut at the first quoted piece of the document (a tag, an alias) it would repeat; quoted
    single characters and token names ('<scalar>') stay, they say what is wrong without saying much."""
    out: list[str] = []
    pos = 0
    for m in [*_SAFE_QUOTED.finditer(text), None]:
        chunk = text[pos:] if m is None else text[pos:m.start()]
        quote = min((i for i in (chunk.find("'"), chunk.find('"')) if i >= 0), default=-1)
        if quote >= 0:
            return "".join(out) + chunk[:quote] + "'...'"
        out.append(chunk if m is None else chunk + m.group(0))
        if m is not None:
            pos = m.end()
    return "".join(out)


def yaml_error_summary(exc: yaml.YAMLError) -> str:
    """The problem and its line/column, never a snippet: PyYAML's own message quotes the offending line, and in
    a key file, a config file or a Secret that line is a secret (which then reaches the logs)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = _without_content(exc.problem or exc.context or "syntax error")
        mark = exc.problem_mark or exc.context_mark
        return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(exc, "position", None)
    if isinstance(position, int):  # yaml.reader.ReaderError: a character YAML does not accept
        return f"a character YAML does not accept at offset {position}"
    return f"not valid YAML ({type(exc).__name__})"


def decode_error_summary(exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, without the bytes around it (``str(exc)`` shows the byte)."""
    return f"not UTF-8 text (byte offset {exc.start})"


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a pair; a clear error otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _coerce(name: str, raw: Any) -> Any:
    f = _FIELDS[name]
    typ = str(f.type)
    try:
        if name == "routes":
            return tuple(CustomRoute(**dict(r)) for r in (raw or ()))
        if name == "allow_routes":
            return tuple(AllowedRoute(**dict(r)) for r in (raw or ()))
        if name == "sinks":
            return tuple(dict(r) for r in (raw or ()))
        if name in _TUPLE_OF_STR:
            if isinstance(raw, str):
                raw = [p.strip() for p in raw.split(",") if p.strip()]
            return tuple(str(p) for p in raw)
        if raw is None:
            return None
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from exc


def _read_secret_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"setting {name}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"setting {name}: {path}: {decode_error_summary(exc)}") from None


def _from_mapping(source: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in source.items():
        if key.endswith("_file") and key[:-5] in _SECRETS:
            out[key[:-5]] = _read_secret_file(key[:-5], str(raw))
            continue
        if key not in _FIELDS:
            raise ConfigError(f"{origin}: unknown setting {key!r}")
        out[key] = _coerce(key, raw)
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    picked: dict[str, Any] = {}
    for name in _FIELDS:
        env_name = "GUARD_" + name.upper()
        if name in _SECRETS and env.get(env_name + "_FILE"):
            picked[name + "_file"] = env[env_name + "_FILE"]
        if env_name in env and env[env_name] != "":
            if name in ("routes", "allow_routes", "sinks"):
                try:
                    picked[name] = yaml.safe_load(env[env_name])
                except yaml.YAMLError as exc:  # sinks may carry tokens: no snippet
                    raise ConfigError(f"{env_name}: not YAML: {yaml_error_summary(exc)}") from None
            else:
                picked[name] = env[env_name]
    return _from_mapping(picked, "environment")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers in precedence order and validate the result."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {config_file}: {decode_error_summary(exc)}") from None
        except yaml.YAMLError as exc:  # the file may hold secrets inline: no snippet
            raise ConfigError(f"config {config_file}: not YAML: {yaml_error_summary(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {config_file}: expected a mapping at the top level")
        merged.update(_from_mapping(data, str(config_file)))
    merged.update(_from_env(os.environ if env is None else env))
    if flags:
        merged.update(_from_mapping({k: v for k, v in flags.items() if v is not None}, "flags"))
    settings = Settings(**merged)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    parse_hostport(s.listen)
    parse_hostport(s.admin_listen)
    if not s.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"upstream must be an http(s) URL, got {s.upstream!r}")
    for cidr in s.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from exc
    unknown = set(s.session_sources) - {"header", "bearer", "address"}
    if unknown or not s.session_sources:
        raise ConfigError(f"session_sources: expected some of header, bearer, address; got {s.session_sources}")
    if s.redis_url and not s.hmac_key:
        raise ConfigError("hmac_key (GUARD_HMAC_KEY or GUARD_HMAC_KEY_FILE) is required with redis_url: "
                          "replicas must derive the same session ids")
    if s.workers > 1 and not s.redis_url:
        raise ConfigError(f"workers={s.workers} needs redis_url (GUARD_REDIS_URL): without a shared store each "
                          "worker would see only part of a session's requests")
    if s.workers > 1 and (s.capture_dir or s.spool_dir):
        raise ConfigError("workers > 1 cannot share capture_dir or spool_dir: run one worker per pod to use them")
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {s.log_level!r}")
    if not 0.0 <= s.log_sample_allow <= 1.0:
        raise ConfigError("log_sample_allow must be within [0, 1]")
    for positive in ("connect_timeout", "read_timeout", "max_body_bytes", "max_header_bytes",
                     "max_json_depth", "max_batch_rows", "client_read_timeout", "session_max",
                     "header_read_timeout", "max_connections",
                     "session_ttl", "canary_interval", "workers", "upstream_pool_size", "capture_max_bytes",
                     "capture_max_files", "global_window", "global_half_count", "global_max_entries"):
        if getattr(s, positive) <= 0:
            raise ConfigError(f"{positive} must be positive")
    for route in s.routes:
        if not route.path.startswith("/") or not route.pointer.startswith("/"):
            raise ConfigError(f"routes: path and pointer must start with '/': {route}")

