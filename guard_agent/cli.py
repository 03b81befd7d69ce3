"""``guard-agent``: every subcommand is a module of ``guard_agent.commands`` with ``add_arguments(parser)`` and
``run(args) -> int``; exit statuses, error lines and ``--json`` follow ``guard_agent.commands._convention``.

Settings precedence for ``run``: flags > ``GUARD_*`` environment > ``--config`` file > defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from guard_agent import __version__
from guard_agent.commands._convention import CommandError, Parser, error_line

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("run", "guard_agent.commands.run", "serve: the guard listener in front of the model, and the admin listener"),
    ("check", "guard_agent.commands.check", "validate policy files; exit 1 with file, line and field on error"),
    ("fit", "guard_agent.commands.fit", "fit a detector profile on reference data"),
    ("demo", "guard_agent.commands.demo", "run the guard in front of a built-in model, send traffic, print decisions"),
    ("canary", "guard_agent.commands.canary", "record canary queries against the approved model"),
    ("sign", "guard_agent.commands.sign", "sign a model directory's files (Ed25519 manifest)"),
    ("replay", "guard_agent.commands.replay", "re-decide captured traffic under a new policy and diff"),
    ("tune", "guard_agent.commands.tune", "suggest thresholds for a target false-positive rate"),
    ("report", "guard_agent.commands.report", "write a self-contained HTML report of captured traffic"),
    ("selftest", "guard_agent.commands.selftest", "run a bounded red-team test against a running guard"),
    ("explain", "guard_agent.commands.explain", "tell one session's story: scores, rules, why and until when blocked"),
    ("status", "guard_agent.commands.status", "a running guard on one screen: readiness, revisions, decisions, health"),
)
"""(name, module, one-line help) of every subcommand, in the order ``--help`` lists them."""


def _add_commands(sub: argparse._SubParsersAction[Parser]) -> dict[str, str]:
    """Each command's parser; a command whose module is not installed is left out (not an error)."""
    found: dict[str, str] = {}
    for name, module, help_text in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue
            raise
        mod.add_arguments(sub.add_parser(name, help=help_text, description=_sentence(help_text)))
        found[name] = module
    return found


def _sentence(text: str) -> str:
    """A help line as the opening sentence of a subcommand's --help."""
    return f"{text[0].upper()}{text[1:]}."


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="guard-agent", description="inference-guard: a runtime guard for ML models")
    parser.add_argument("--version", action="version", version=f"guard-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(command_modules=_add_commands(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # named by the subcommand that was parsed, not the top-level parser as argparse would
        return error_line(args.command_prog, f"unrecognized arguments: {' '.join(unknown)} "
                                             f"(see {args.command_prog} --help)")
    try:
        result: int = importlib.import_module(args.command_modules[args.command]).run(args)
    except CommandError as exc:
        return error_line(args.command_prog, str(exc))
    return result


if __name__ == "__main__":
    sys.exit(main())
