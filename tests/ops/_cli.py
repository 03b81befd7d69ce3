"""Run ``guard-agent`` in-process, as a user would from a shell, capturing what it prints."""

from __future__ import annotations

import contextlib
import io

import orjson

from guard_agent.cli import main


def cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``guard-agent ARGV``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cli_json(*argv: str) -> dict[str, object]:
    code, out, err = cli(*argv, "--json")
    assert code in (0, 1), err
    value = orjson.loads(out)
    assert isinstance(value, dict)
    return value
