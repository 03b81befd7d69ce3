"""``guard-agent``: run, check, fit, demo, and the subcommands in ``guard_agent.commands``.

Settings precedence for ``run``: flags > ``GUARD_*`` environment > ``--config`` file > defaults. Exit statuses,
error lines and ``--json`` follow ``guard_agent.commands._convention`` for every subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from guard_agent import __version__
from guard_agent.commands._convention import (
    FAILED,
    OK,
    CommandError,
    Parser,
    add_json_argument,
    error_line,
    print_json,
)

__all__ = ["main"]


_RUN_HELP = "serve: the guard listener in front of the model, and the admin listener"
_RUN_EPILOG = """\
Precedence: flags > GUARD_* environment > --config file > defaults.
Every other setting (timeouts, limits, TLS, API keys, JWT, sinks, routes, ...) has an
environment name GUARD_<NAME> and a --config key <name>: see the README's Configuration
section. Set GUARD_HMAC_KEY (or GUARD_HMAC_KEY_FILE), or session ids change on every restart.
Decision events go to stdout, one JSON object per line."""


def _add_run(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("run", help=_RUN_HELP, description=_sentence(_RUN_HELP), epilog=_RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file, keys = setting names (no env name; default: none)")
    p.add_argument("--listen", help="HOST:PORT for inference traffic (GUARD_LISTEN; default 0.0.0.0:8080)")
    p.add_argument("--admin-listen", dest="admin_listen",
                   help="HOST:PORT for /livez, /readyz, /metrics, /admin (GUARD_ADMIN_LISTEN; default 0.0.0.0:9090)")
    p.add_argument("--upstream", help="model server URL (GUARD_UPSTREAM; default http://127.0.0.1:8081)")
    p.add_argument("--policy", help="policy file, or a directory holding policy.yaml "
                                    "(GUARD_POLICY; default: the built-in policy, as examples/policy.yaml)")
    p.add_argument("--profile", help="detector profile directory, or a directory of <model>/profile.json "
                                     "(GUARD_PROFILE; default: none, built-in checks only)")
    p.add_argument("--redis-url", dest="redis_url",
                   help="Redis URL for session state shared by replicas (GUARD_REDIS_URL; default: in memory)")
    p.add_argument("--log-sample-allow", dest="log_sample_allow", type=float,
                   help="fraction of allow events to log; alerts are never sampled "
                        "(GUARD_LOG_SAMPLE_ALLOW; default 1.0)")


def _run(args: argparse.Namespace) -> int:
    from detectors import ProfileError
    from guard_agent.policy.loader import PolicyError
    from guard_agent.server import ListenError, serve
    from guard_agent.settings import ConfigError, load_settings

    flags = {k: getattr(args, k) for k in ("listen", "admin_listen", "upstream", "policy", "profile", "redis_url",
                                            "log_sample_allow")}
    try:
        settings = load_settings(args.config, flags=flags)
        if settings.workers > 1:
            from guard_agent.workers import run_workers

            return run_workers(settings)
        return asyncio.run(serve(settings))
    except ConfigError as exc:
        return error_line(args.command_prog, f"configuration error: {exc}")
    except ListenError as exc:  # a port already taken: one line naming the address, exit at once
        return error_line(args.command_prog, exc.strerror or str(exc))
    except (PolicyError, ProfileError) as exc:  # a bad first policy or profile: say what, not a traceback
        return error_line(args.command_prog, f"cannot start: {exc}")


def _check(args: argparse.Namespace) -> int:
    from guard_agent.policy.loader import PolicyError, load_policy_file

    results: list[dict[str, object]] = []
    for path in args.policy:
        try:
            policy = load_policy_file(path).policy
        except PolicyError as exc:
            results.append({"path": path, "ok": False, "error": str(exc)})
            if not args.json:
                print(f"error: {exc}", file=sys.stderr)
            continue
        results.append({"path": path, "ok": True, "source": policy.source, "revision": policy.revision,
                        "mode": policy.default.mode, "rules": len(policy.default.rules),
                        "model_overrides": len(policy.models)})
        if not args.json:
            print(f"ok: {policy.source}: revision {policy.revision[:12]}, mode {policy.default.mode}, "
                  f"{len(policy.default.rules)} rules, {len(policy.models)} model overrides")
    if args.json:
        print_json(results)
    return OK if all(r["ok"] for r in results) else FAILED


def _add_fit(sub: argparse._SubParsersAction[Parser]) -> None:
    try:
        from guard_agent.fit_command import add_fit_arguments
    except ImportError:
        return
    text = "fit a detector profile on reference data"
    p = sub.add_parser("fit", help=text, description=f"{text[0].upper()}{text[1:]}: the detectors, their "
                       "calibration and the session trackers, written to a directory GUARD_PROFILE points at.")
    add_fit_arguments(p)


def _fit(args: argparse.Namespace) -> int:
    from guard_agent.fit_command import run_fit

    return run_fit(args)


def _demo(args: argparse.Namespace) -> int:
    from guard_agent.demo import run_demo

    return asyncio.run(run_demo(verbose=args.verbose))


OPTIONAL_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("canary", "guard_agent.commands.canary", "record canary queries against the approved model"),
    ("sign", "guard_agent.commands.sign", "sign a model directory's files (Ed25519 manifest)"),
    ("replay", "guard_agent.commands.replay", "re-decide captured traffic under a new policy and diff"),
    ("tune", "guard_agent.commands.tune", "suggest thresholds for a target false-positive rate"),
    ("report", "guard_agent.commands.report", "write a self-contained HTML report of captured traffic"),
    ("selftest", "guard_agent.commands.selftest", "run a bounded red-team test against a running guard"),
    ("explain", "guard_agent.commands.explain", "tell one session's story: scores, rules, why and until when blocked"),
    ("status", "guard_agent.commands.status", "a running guard on one screen: readiness, revisions, decisions, health"),
)
"""Subcommands in their own modules: each has ``add_arguments(parser)`` and ``run(args) -> int``."""


def _add_optional(sub: argparse._SubParsersAction[Parser]) -> dict[str, str]:
    import importlib

    found: dict[str, str] = {}
    for name, module, help_text in OPTIONAL_COMMANDS:
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
    _add_run(sub)
    check_help = "validate policy files; exit 1 with file, line and field on error"
    c = sub.add_parser("check", help=check_help, description=(
        "Validate policy files without running the guard: YAML syntax, every section's fields and types, rule "
        "ids, actions, score and property names, operators, thresholds (scores lie in [0, 1]), CIDRs, "
        "per-model overrides. Prints the revision the guard would stamp on its events; exits 1 with "
        "file:line: field: message on the first error of each file."))
    c.add_argument("policy", nargs="+", help="policy file(s) or directories holding policy.yaml")
    add_json_argument(c, "one result per policy")
    _add_fit(sub)
    demo_help = "run the guard in front of a built-in model, send traffic, print decisions"
    d = sub.add_parser("demo", help=demo_help, description=_sentence(demo_help) + " Exits within a minute.")
    d.add_argument("--verbose", action="store_true", help="also print every decision event")
    parser.set_defaults(optional_commands=_add_optional(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # named by the subcommand that was parsed, not the top-level parser as argparse would
        return error_line(args.command_prog, f"unrecognized arguments: {' '.join(unknown)} "
                                             f"(see {args.command_prog} --help)")
    handlers = {"run": _run, "check": _check, "fit": _fit, "demo": _demo}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        import importlib

        module = importlib.import_module(args.optional_commands[args.command])
        result: int = module.run(args)
    except CommandError as exc:
        return error_line(args.command_prog, str(exc))
    return result


if __name__ == "__main__":
    sys.exit(main())
