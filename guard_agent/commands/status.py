"""``guard-agent status --admin URL``: a running guard on one screen, for an incident.

Policy and profile revisions, readiness and its reasons, decisions of the last minutes by action and
rule, the sessions with the highest risk, and the health of the SIEM sinks and of Redis. Read-only: it
calls ``GET /admin/status`` and ``GET /admin/decisions`` with the admin token. ``--json`` prints both
answers as one JSON object for tools. Exit 0 when the guard is ready, 1 when it answers but is not
ready, 2 when it cannot be asked.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from guard_agent.commands._admin_client import AdminError, add_admin_arguments, admin_get, read_token
from guard_agent.commands._convention import FAILED, OK, CommandError, add_json_argument, print_json

__all__ = ["add_arguments", "format_status", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_admin_arguments(parser, required=True)
    parser.add_argument("--minutes", type=int, default=5, help="window for the decision counts (1..60, default 5)")
    parser.add_argument("--top", type=int, default=5, help="sessions to list by risk (default 5)")
    add_json_argument(parser, "the admin answers")


def _rev(value: object) -> str:
    return str(value)[:12] if value else "none"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _health_lines(status: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    sinks: dict[str, dict[str, float]] = status.get("sinks") or {}
    if not sinks:
        lines.append("sinks      stdout only")
    for name, s in sorted(sinks.items()):
        state = "up" if s.get("up", 1) == 1 else "DOWN"
        lines.append(f"sink {name:<10} {state}: delivered {s.get('delivered', 0):.0f}, backlog "
                     f"{s.get('backlog_events', 0):.0f}, spooled {s.get('spooled', 0):.0f}, dropped "
                     f"{s.get('dropped', 0):.0f}, rejected {s.get('rejected', 0):.0f}, failures "
                     f"{s.get('send_failures', 0):.0f}")
    redis = status.get("redis") or {}
    if not redis.get("configured"):
        lines.append(f"sessions   in memory ({status['sessions']['local']} live)")
    else:
        fallbacks = ", ".join(f"{k} {v:.0f}" for k, v in sorted((redis.get("fallbacks") or {}).items())) or "none"
        lines.append(f"redis      {'up' if redis.get('up') else 'DOWN: local fallback in use'}; fallbacks: "
                     f"{fallbacks}; unsynced sessions {redis.get('dirty_sessions', 0):.0f}")
    return lines


def format_status(status: dict[str, Any], decisions: dict[str, Any], *, now: float | None = None) -> str:
    """Plain text, most important first: readiness, revisions, what the guard decided, who, plumbing."""
    now = time.time() if now is None else now
    policy, profile = status["policy"], status["profile"]
    ready = "READY" if status["ready"] else "NOT READY"
    lines = [f"guard      {ready}  (version {status['version']}, up {_age(status['uptime_seconds'])}, "
             f"{status['in_flight']} in flight)"]
    for check, reason in sorted((status.get("reasons") or {}).items()):
        lines.append(f"  not ready: {check}: {reason}")
    reloads = policy.get("reloads") or {}
    lines.append(f"policy     {_rev(policy['revision'])}  mode {policy['mode']}  from {policy['source']}  "
                 f"(reloads ok {reloads.get('ok', 0):.0f}, rejected {reloads.get('failed', 0):.0f})")
    for warning in policy.get("warnings") or ():
        lines.append(f"  warning: {warning}")
    preloads = profile.get("reloads") or {}
    lines.append(f"profile    {_rev(profile['revision']) if profile['configured'] else 'none (built-in checks only)'}"
                 + (f"  (reloads ok {preloads.get('ok', 0):.0f}, rejected {preloads.get('failed', 0):.0f})"
                    if profile["configured"] else ""))
    lines.append("")
    window = decisions["minutes"]
    sampled = "" if decisions.get("log_sample_allow", 1.0) >= 1.0 else \
        f" (allow counted after sampling at {decisions['log_sample_allow']})"
    lines.append(f"decisions in the last {window} min: {decisions['total']}{sampled}")
    by_action = decisions.get("by_action") or {}
    if by_action:
        lines.append("  by action: " + ", ".join(f"{a} {n}" for a, n in by_action.items()))
    for row in (decisions.get("by_action_rule") or [])[:10]:
        lines.append(f"  {row['count']:>7}  {row['action']:<19} rule {row['rule']}")
    top = decisions.get("top_sessions") or []
    if top:
        lines.append("")
        lines.append(f"top sessions by risk (last {window} min):")
        lines.append(f"  {'session':<18} {'risk':>6} {'requests':>8}  {'refused':>7}  last decision")
        for s in top:
            refused = s["actions"].get("block", 0) + s["actions"].get("throttle", 0)
            lines.append(f"  {s['session'][:16]:<18} {s['max_risk']:>6.3f} {s['requests']:>8}  {refused:>7}  "
                         f"{s['last_action']} ({s['last_rule']}) {_age(now - s['last_seen'])} ago")
        lines.append("  (guard-agent explain SESSION --admin URL tells one session's story)")
    lines.append("")
    lines.extend(_health_lines(status))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        token = read_token(args)
        status = admin_get(args.admin, "/admin/status", token, timeout=args.timeout)
        decisions = admin_get(args.admin, "/admin/decisions", token, timeout=args.timeout,
                              query={"minutes": str(args.minutes), "top": str(args.top)})
    except AdminError as exc:
        raise CommandError(str(exc)) from exc
    try:
        if args.json:
            print_json({"status": status, "decisions": decisions})
        else:
            print(format_status(status, decisions))
    except (KeyError, TypeError) as exc:
        raise CommandError(f"the admin API answered in an unexpected shape ({exc}); is the guard's version the "
                           "same as this command's?") from exc
    return OK if status.get("ready") else FAILED
