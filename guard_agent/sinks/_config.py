"""Sink configuration: the mappings of ``settings.sinks`` validated into frozen dataclasses.

Every mistake is a ``ConfigError`` naming the sink (``sinks[1] (splunk): ...``) so an
operator can fix the file without reading code. Secrets (HTTP tokens) are never accepted
inline: they come from a file (a mounted Secret) or an environment variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from guard_agent.settings import ConfigError

__all__ = ["FACILITIES", "HttpSinkConfig", "SinkConfig", "SyslogSinkConfig", "TlsConfig", "parse_sinks"]

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}
HTTP_FORMATS = ("ndjson", "splunk_hec", "elastic_bulk")
_DEFAULT_SCHEME = {"ndjson": "Bearer", "splunk_hec": "Splunk", "elastic_bulk": "ApiKey"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


@dataclass(frozen=True)
class TlsConfig:
    """Client TLS: verify the receiver against ``ca_file`` (system CAs when unset); optional client cert."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class SinkConfig:
    """What every sink has: a name (metric label, spool directory), queue, spool and retry bounds."""

    name: str
    spool_dir: str
    queue_size: int = 10_000
    spool_max_bytes: int = 256 * 1024 * 1024
    batch_max_events: int = 500
    batch_max_bytes: int = 1024 * 1024
    timeout: float = 5.0
    retry_initial: float = 0.5
    retry_max: float = 30.0


@dataclass(frozen=True)
class SyslogSinkConfig(SinkConfig):
    """RFC 5424 over TCP (RFC 6587 octet counting) or TLS (RFC 5425)."""

    host: str = ""
    port: int = 0
    tls: TlsConfig | None = None
    facility: int = FACILITIES["local0"]
    app_name: str = "inference-guard"
    hostname: str | None = None


@dataclass(frozen=True)
class HttpSinkConfig(SinkConfig):
    """Batches of JSON lines POSTed to a URL with a token header (generic, Splunk HEC, Elastic bulk)."""

    url: str = ""
    format: str = "ndjson"
    token_file: str | None = None
    token_env: str | None = None
    token_header: str = "Authorization"  # noqa: S105 - a header name, not a secret
    token_scheme: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    tls: TlsConfig | None = None
    index: str | None = None
    sourcetype: str = "_json"

    def read_token(self) -> str | None:
        """The current token (re-read on auth failures so a rotated Secret is picked up)."""
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"sink {self.name}: cannot read token_file {self.token_file}: "
                                  f"{exc.strerror}") from exc
        if self.token_env:
            value = os.environ.get(self.token_env, "").strip()
            if not value:
                raise ConfigError(f"sink {self.name}: environment variable {self.token_env} (token_env) is empty")
            return value
        return None


_COMMON = {"name", "type", "queue_size", "spool_max_bytes", "batch_max_events", "batch_max_bytes", "timeout",
           "retry_initial", "retry_max"}
_TLS_KEYS = {"ca_file", "cert_file", "key_file", "server_name"}
_SYSLOG_KEYS = _COMMON | _TLS_KEYS | {"host", "port", "tls", "facility", "app_name", "hostname"}
_HTTP_KEYS = _COMMON | _TLS_KEYS | {"url", "format", "token_file", "token_env", "token_header", "token_scheme",
                                    "headers", "index", "sourcetype"}


class _Reader:
    """Typed access to one sink mapping with errors that name the sink and the key."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw.get(key, default)
        if value is None:
            if required:
                raise self.fail(f"{key} is required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{key} must be a non-empty string, got {value!r}")
        return value.strip()

    def number(self, key: str, default: float, *, integer: bool = False, minimum: float = 0.0,
               maximum: float | None = None) -> Any:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            kind = "an integer" if integer else "a number"
            raise self.fail(f"{key} must be {kind}, got {value!r}")
        if value <= minimum or (maximum is not None and value > maximum):
            bound = f"> {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
            raise self.fail(f"{key} must be {bound}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, got {value!r}")
        return value

    def readable_file(self, key: str) -> str | None:
        path = self.string(key)
        if path is not None and not os.access(path, os.R_OK):
            raise self.fail(f"{key} {path} is not a readable file")
        return path


def _tls(r: _Reader, enabled: bool) -> TlsConfig | None:
    given = sorted(k for k in _TLS_KEYS if k in r.raw)
    if not enabled:
        if given:
            raise r.fail(f"{', '.join(given)} given but TLS is off (set tls: true or use an https:// url)")
        return None
    tls = TlsConfig(ca_file=r.readable_file("ca_file"), cert_file=r.readable_file("cert_file"),
                    key_file=r.readable_file("key_file"), server_name=r.string("server_name"))
    if bool(tls.cert_file) != bool(tls.key_file):
        raise r.fail("cert_file and key_file (client certificate) must be given together")
    return tls


def _common(r: _Reader, name: str, spool_root: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "spool_dir": os.path.join(spool_root, name),
        "queue_size": r.number("queue_size", 10_000, integer=True),
        "spool_max_bytes": r.number("spool_max_bytes", 256 * 1024 * 1024, integer=True, minimum=64 * 1024 - 1),
        "batch_max_events": r.number("batch_max_events", 500, integer=True, maximum=100_000),
        "batch_max_bytes": r.number("batch_max_bytes", 1024 * 1024, integer=True, minimum=1023),
        "timeout": r.number("timeout", 5.0, maximum=300.0),
        "retry_initial": r.number("retry_initial", 0.5, maximum=600.0),
        "retry_max": r.number("retry_max", 30.0, maximum=3600.0),
    }
    if out["retry_max"] < out["retry_initial"]:
        raise r.fail("retry_max must be >= retry_initial")
    return out


def _syslog(r: _Reader, name: str, spool_root: str) -> SyslogSinkConfig:
    unknown = sorted(set(r.raw) - _SYSLOG_KEYS)
    if unknown:
        raise r.fail(f"unknown key(s) {', '.join(unknown)} for a syslog sink "
                     f"(known: {', '.join(sorted(_SYSLOG_KEYS))})")
    host = r.string("host", required=True)
    if "port" not in r.raw:
        raise r.fail("port is required (6514 is the usual syslog-over-TLS port, 514 or 601 for plain TCP)")
    port = r.number("port", 0, integer=True, maximum=65535)
    facility = r.raw.get("facility", "local0")
    if isinstance(facility, str) and facility in FACILITIES:
        code = FACILITIES[facility]
    elif isinstance(facility, int) and not isinstance(facility, bool) and 0 <= facility <= 23:
        code = facility
    else:
        raise r.fail(f"facility must be 0..23 or one of {', '.join(FACILITIES)}, got {facility!r}")
    tls_on = r.boolean("tls", False)
    app_name = r.string("app_name", "inference-guard") or "inference-guard"
    if len(app_name) > 48 or not all(33 <= ord(c) <= 126 for c in app_name):
        raise r.fail("app_name must be 1..48 printable ASCII characters without spaces (RFC 5424 APP-NAME)")
    return SyslogSinkConfig(**_common(r, name, spool_root), host=str(host), port=int(port), tls=_tls(r, tls_on),
                            facility=code, app_name=app_name, hostname=r.string("hostname"))


def _headers(r: _Reader) -> tuple[tuple[str, str], ...]:
    raw = r.raw.get("headers", {}) or {}
    if not isinstance(raw, Mapping):
        raise r.fail("headers must be a mapping of header name to value")
    out = []
    for key, value in raw.items():
        if not isinstance(key, str) or not _HEADER.match(key) or not isinstance(value, str) or "\n" in value \
                or "\r" in value:
            raise r.fail(f"headers: invalid header {key!r}")
        if key.lower() in ("authorization", "content-length", "content-type", "host"):
            raise r.fail(f"headers: {key} is set by the sink (use token_file/token_env for credentials)")
        out.append((key, value))
    return tuple(out)


def _http(r: _Reader, name: str, spool_root: str) -> HttpSinkConfig:
    unknown = sorted(set(r.raw) - _HTTP_KEYS)
    if "token" in unknown:
        raise r.fail("token must not be written in the config: use token_file (a mounted Secret) or token_env")
    if unknown:
        raise r.fail(f"unknown key(s) {', '.join(unknown)} for an http sink (known: {', '.join(sorted(_HTTP_KEYS))})")
    url = str(r.string("url", required=True))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.fail(f"url must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise r.fail("url must not carry credentials: use token_file or token_env")
    fmt = r.string("format", "ndjson")
    if fmt not in HTTP_FORMATS:
        raise r.fail(f"format must be one of {', '.join(HTTP_FORMATS)}, got {fmt!r}")
    token_file, token_env = r.readable_file("token_file"), r.string("token_env")
    if token_file and token_env:
        raise r.fail("give token_file or token_env, not both")
    header = r.string("token_header", "Authorization") or "Authorization"
    if not _HEADER.match(header):
        raise r.fail(f"token_header {header!r} is not a valid header name")
    scheme = r.raw.get("token_scheme", _DEFAULT_SCHEME[str(fmt)])
    if not isinstance(scheme, str):
        raise r.fail("token_scheme must be a string ('' for a bare token)")
    config = HttpSinkConfig(**_common(r, name, spool_root), url=url, format=str(fmt), token_file=token_file,
                            token_env=token_env, token_header=header, token_scheme=scheme.strip(),
                            headers=_headers(r), tls=_tls(r, parts.scheme == "https"), index=r.string("index"),
                            sourcetype=r.string("sourcetype", "_json") or "_json")
    config.read_token()  # fail now, not at the first delivery
    return config


def parse_sinks(raw: Sequence[Mapping[str, Any]], spool_dir: str | None) -> tuple[SinkConfig, ...]:
    """Validate ``settings.sinks``; a spool directory is required as soon as one sink is configured."""
    configs: list[SinkConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"sinks[{i}]: expected a mapping, got {type(item).__name__}")
        kind = item.get("type")
        name = item.get("name", f"{kind}-{i}")
        r = _Reader(item, f"sinks[{i}] ({name})")
        if kind not in ("syslog", "http"):
            raise r.fail(f"type must be syslog or http, got {kind!r}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise r.fail("name must be 1..63 of a-z 0-9 _ . - (it names the metric label and the spool directory)")
        if name in seen:
            raise r.fail(f"duplicate sink name {name!r}")
        seen.add(name)
        if not spool_dir:
            raise ConfigError("spool_dir (GUARD_SPOOL_DIR) is required when sinks are configured: events wait there "
                              "while a sink is down (mount a writable volume)")
        configs.append(_syslog(r, name, spool_dir) if kind == "syslog" else _http(r, name, spool_dir))
    return tuple(configs)

