"""A small synchronous client for a running guard's admin API (``status``, ``explain``).

The token comes from ``--token-file`` or ``GUARD_ADMIN_TOKEN`` (never a flag value: command lines are
visible to every user of the machine in ``ps``).
"""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

__all__ = ["AdminError", "add_admin_arguments", "admin_get", "read_token"]


class AdminError(Exception):
    """The admin API could not be asked, or refused: the message says which and what to check."""


def add_admin_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--admin", required=required,
                        help="the guard's admin URL, e.g. http://127.0.0.1:9090 (the admin port, not the guard port)")
    parser.add_argument("--token-file", dest="token_file",
                        help="file holding the admin token (default: the GUARD_ADMIN_TOKEN environment variable)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per admin request (default 5)")


def read_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise AdminError(f"cannot read the token file: {exc.strerror}") from None
    else:
        token = os.environ.get("GUARD_ADMIN_TOKEN", "").strip()
    if not token:
        raise AdminError("no admin token: pass --token-file or set GUARD_ADMIN_TOKEN")
    return token


def admin_get(base: str, path: str, token: str, *, timeout: float = 5.0,
              query: dict[str, str] | None = None) -> dict[str, Any]:
    """GET ``base + path`` with the bearer token; the decoded JSON object, or AdminError with the reason."""
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise AdminError(f"{base}: the admin URL must start with http:// or https://")
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 (the scheme is checked above)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = _error_message(exc.read())
        hint = {401: "the token is wrong", 404: "the admin API is disabled (no admin token set on the guard) "
                                                "or the guard is older than this command"}.get(exc.code, "")
        raise AdminError(f"{url}: HTTP {exc.code}: {detail}" + (f" ({hint})" if hint else "")) from None
    except urllib.error.URLError as exc:
        raise AdminError(f"{url}: cannot connect: {exc.reason}") from None
    except OSError as exc:  # a reset or timeout while reading
        raise AdminError(f"{url}: {exc}") from None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AdminError(f"{url}: the answer is not JSON (is this the admin port?)") from None
    if not isinstance(value, dict):
        raise AdminError(f"{url}: unexpected answer")
    return value


def _error_message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
        return str(doc["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
