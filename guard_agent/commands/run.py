"""``guard-agent run``: serve the guard listener in front of the model, and the admin listener.

Settings precedence: flags > ``GUARD_*`` environment > ``--config`` file > defaults.
"""

from __future__ import annotations

import argparse
import asyncio

from guard_agent.commands._convention import error_line

__all__ = ["add_arguments", "run"]

_EPILOG = """\
Precedence: flags > GUARD_* environment > --config file > defaults.
Every other setting (timeouts, limits, TLS, API keys, JWT, sinks, routes, ...) has an
environment name GUARD_<NAME> and a --config key <name>: see the README's Configuration
section. Set GUARD_HMAC_KEY (or GUARD_HMAC_KEY_FILE), or session ids change on every restart.
Decision events go to stdout, one JSON object per line."""

_FLAGS = ("listen", "admin_listen", "upstream", "policy", "profile", "redis_url", "log_sample_allow")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
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


def run(args: argparse.Namespace) -> int:
    from detectors import ProfileError
    from guard_agent.policy.loader import PolicyError
    from guard_agent.server import ListenError, serve
    from guard_agent.settings import ConfigError, load_settings

    given = vars(args)
    flags = {k: given[k] for k in _FLAGS}
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

