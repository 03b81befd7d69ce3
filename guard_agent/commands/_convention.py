"""What every ``guard-agent`` subcommand shares, so scripts and CI can drive any of them the same way.

- Exit 0: done, and every check passed. Exit 1 (``FAILED``): the command ran and what it checked failed (an
  invalid policy, requests that would newly be blocked, a failed self-test, a model that fails its canaries or
  its signature, an unknown session, a guard that is not ready). Exit 2 (``USAGE``): a usage or configuration
  error; nothing was checked.
- Errors are one line on stderr, ``guard-agent COMMAND: message`` (argparse's own included): a log collector or
  a CI step shows the whole reason, never a traceback or a usage block.
- ``--json`` prints the machine-readable result as one JSON document on stdout instead of the text.
- Options are ``--kebab-case``. Secrets are read from files (``--token-file``, ``--capture-key-file``),
  never given as option values, which other users of the machine can read in the process list.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final, NoReturn

import orjson

__all__ = ["FAILED", "OK", "USAGE", "CommandError", "Parser", "add_json_argument", "error_line", "print_json",
           "warn"]

OK: Final = 0
FAILED: Final = 1
USAGE: Final = 2


class CommandError(Exception):
    """A usage or configuration error: ``cli.main`` prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with the one-line usage error (exit 2); ``args.command_prog`` names the (sub)command parsed.

    Subparsers are built with the parent's class, and a subparser's defaults override its parent's, so the
    deepest command parsed (``guard-agent canary record``) is the one errors name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(command_prog=self.prog)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(prog: str, message: str, status: int = USAGE) -> int:
    """Print ``PROG: message`` as one line on stderr; returns ``status`` (a usage error unless told)."""
    print(f"{prog}: {_one_line(message)}", file=sys.stderr)
    return status


def warn(prog: str, message: str) -> None:
    """A warning that does not stop the command, one line on stderr."""
    print(f"{prog}: warning: {_one_line(message)}", file=sys.stderr)


def add_json_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON document instead of text")


def print_json(doc: Any) -> None:
    """One indented JSON document on stdout (numpy values and non-string keys, e.g. a per-model ``None``, included)."""
    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    sys.stdout.write(orjson.dumps(doc, option=options).decode() + "\n")
