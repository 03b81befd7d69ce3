"""``guard-agent explain ID``: why was this client blocked? One session's story, from its decisions.

``ID`` is a session hash (``guard.session`` in the events) or a request id (``http.request.id``, the
``X-Request-Id`` the client got back): a request id stands for its session. The decisions come from
captured decision files (``--capture DIR_OR_FILE``, the ``GUARD_CAPTURE_DIR`` files or a JSON event log)
and, with ``--admin URL``, from a running guard's admin API (the decisions it still holds and the
session's live record: the authoritative block and its end). The story: when the session started, how
many requests, its scores over time, which rules fired and when, why it is blocked and until when, and
how to lift the block. ``--json`` prints the same as one JSON object. Exit 0 when the session was
found, 1 when not, 2 when the sources cannot be read.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from guard_agent.commands._admin_client import AdminError, add_admin_arguments, admin_get, read_token
from guard_agent.commands._convention import FAILED, OK, CommandError, add_json_argument, error_line, print_json
from guard_agent.policy.model import EffectivePolicy, Policy
from guard_agent.recent import DecisionEntry

__all__ = ["add_arguments", "build_story", "format_story", "run"]

_SHOWN_SCORES = ("session.risk", "session.prada", "session.fingerprint", "session.global_fingerprint",
                 "session.neighbors", "session.crawl", "ood.combined", "adv.squeeze", "input.schema",
                 "integrity.canary")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="a session hash (guard.session) or a request id (X-Request-Id)")
    parser.add_argument("--capture", action="append", default=[], metavar="PATH",
                        help="captured decisions: a capture directory, a capture file or a JSON event log "
                             "(repeatable)")
    add_admin_arguments(parser, required=False)
    add_json_argument(parser, "the story")
    parser.add_argument("--steps", type=int, default=40,
                        help="decisions to print in the text timeline (first and last; default 40)")


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _cooldown(policy: Policy | None, model: str | None, rule: str) -> float | None:
    """Seconds a block by ``rule`` keeps the session blocked under ``policy`` (None = unknown policy)."""
    if policy is None:
        return None
    eff: EffectivePolicy = policy.for_model(model)
    for r in eff.rules:
        if r.id == rule:
            return eff.block_cooldown if r.cooldown is None else r.cooldown
    return eff.block_cooldown


def _descriptions(policy: Policy | None, model: str | None) -> dict[str, str]:
    if policy is None:
        return {}
    return {r.id: r.description for r in policy.for_model(model).rules if r.description}


def _blocks(steps: Sequence[DecisionEntry], policy: Policy | None) -> list[dict[str, Any]]:
    """Cool-downs the decisions show: an enforced block by a rule with a cool-down starts one; the blocks that
    follow within it (the guard answers them before scoring) belong to it."""
    out: list[dict[str, Any]] = []
    for s in steps:
        if s.action != "block" or not s.enforced:
            continue
        if out:
            current = out[-1]
            if (s.t < current["until"]) if current["until"] is not None else (s.rule == current["rule"]):
                current["refused"] += 1
                continue
        cooldown = _cooldown(policy, s.model, s.rule)
        if cooldown is not None and cooldown <= 0:
            continue  # a per-request block: that request only
        out.append({"rule": s.rule, "since": s.t, "request_id": s.request_id,
                    "until": s.t + cooldown if cooldown is not None else None, "refused": 1,
                    "scores": {k: v for k, v in s.scores.items() if k in _SHOWN_SCORES}})
    return out


def build_story(session: str, steps: Sequence[DecisionEntry], *, policy: Policy | None = None,
                record: Mapping[str, Any] | None = None, now: float | None = None,
                admin: str | None = None, sources: Iterable[str] = ()) -> dict[str, Any]:
    """The session's story as data (``--json`` prints it; ``format_story`` renders it for people)."""
    now = time.time() if now is None else now
    steps = sorted(steps, key=lambda s: s.t)
    model = next((s.model for s in reversed(steps) if s.model), None)
    descriptions = _descriptions(policy, model)
    actions: dict[str, int] = {}
    rules: dict[str, dict[str, Any]] = {}
    for s in steps:
        actions[s.action] = actions.get(s.action, 0) + 1
        for rid in dict.fromkeys((*s.matched, *([s.rule] if s.action != "allow" else []))):
            info = rules.setdefault(rid, {"rule": rid, "description": descriptions.get(rid, ""), "first": s.t,
                                          "last": s.t, "matched": 0, "decided": 0})
            info["last"] = s.t
            info["matched"] += 1
        if s.action != "allow":
            rules[s.rule]["decided"] += 1
    blocks = _blocks(steps, policy)
    blocked: dict[str, Any] | None = None
    if record is not None and record.get("blocked_rule") and float(record.get("blocked_until") or 0) > now:
        blocked = {"rule": record["blocked_rule"], "until": float(record["blocked_until"]), "active": True,
                   "source": "live session record"}
        match = next((b for b in reversed(blocks) if b["rule"] == blocked["rule"]), None)
        if match is not None:
            blocked.update(since=match["since"], request_id=match["request_id"], scores=match["scores"])
    elif blocks:
        last = blocks[-1]
        active = last["until"] is None or last["until"] > now
        if record is not None:  # the live record says no block is running (lifted, expired or reset)
            active = False
        blocked = {**last, "active": active, "source": "captured decisions"}
    first = steps[0].t if steps else (record or {}).get("first_seen")
    last_t = steps[-1].t if steps else (record or {}).get("last_seen")
    return {
        "session": session,
        "model": model,
        "sources": list(sources),
        "first_seen": first,
        "last_seen": last_t,
        "requests": len(steps),
        "requests_recorded_by_guard": (record or {}).get("queries"),
        "actions": actions,
        "rules": sorted(rules.values(), key=lambda r: r["first"]),
        "blocked": blocked,
        "blocks": blocks,
        "session_scores": dict((record or {}).get("scores") or {}),
        "timeline": [{"t": s.t, "request_id": s.request_id, "action": s.action, "rule": s.rule,
                      "status": s.status, "enforced": s.enforced, "matched": list(s.matched),
                      "scores": dict(s.scores)} for s in steps],
        "unblock": _unblock_hints(session, admin, blocked),
    }


def _unblock_hints(session: str, admin: str | None, blocked: Mapping[str, Any] | None) -> list[str]:
    if blocked is None or not blocked.get("active"):
        return []
    base = (admin or "http://ADMIN:9090").rstrip("/")
    auth = '-H "Authorization: Bearer $GUARD_ADMIN_TOKEN"'
    hints = [f"lift the block, keep the scores: curl -X POST {auth} {base}/admin/sessions/{session}/unblock",
             f"forget the session (scores restart): curl -X DELETE {auth} {base}/admin/sessions/{session}",
             f"never block it again: add {session} to lists.allow_sessions in the policy (reloaded live)"]
    if blocked.get("until"):
        hints.insert(0, f"wait: the cool-down ends at {_iso(blocked['until'])}")
    return hints


def _fmt_scores(scores: Mapping[str, float]) -> str:
    shown = [(k, scores[k]) for k in _SHOWN_SCORES if k in scores]
    return " ".join(f"{k}={v:.3f}" for k, v in shown) if shown else "(not scored: refused before scoring)"


def format_story(story: Mapping[str, Any], *, steps: int = 40) -> str:
    """Plain text for people: summary, why blocked, rules, the timeline (first and last decisions)."""
    sid = story["session"]
    lines = [f"session {sid}" + (f"  model {story['model']}" if story["model"] else "")]
    if story["first_seen"] is not None:
        lines.append(f"  first seen {_iso(story['first_seen'])}, last seen {_iso(story['last_seen'])}")
    counts = ", ".join(f"{a} {n}" for a, n in sorted(story["actions"].items(), key=lambda kv: -kv[1]))
    lines.append(f"  {story['requests']} decisions found ({counts or 'none'})"
                 + (f"; the guard counts {story['requests_recorded_by_guard']} queries"
                    if story["requests_recorded_by_guard"] is not None else ""))
    blocked = story["blocked"]
    lines.append("")
    if blocked is None:
        lines.append("not blocked: no decision started a block cool-down")
    else:
        state = "BLOCKED" if blocked["active"] else "was blocked (no longer)"
        lines.append(f"{state} by rule {blocked['rule']}" + (f" since {_iso(blocked['since'])}"
                                                              if blocked.get("since") else "")
                     + (f" until {_iso(blocked['until'])}" if blocked.get("until") else " (cool-down unknown)"))
        desc = next((r["description"] for r in story["rules"] if r["rule"] == blocked["rule"]), "")
        if desc:
            lines.append(f"  why: {desc}")
        if blocked.get("scores"):
            lines.append(f"  scores at the block: {_fmt_scores(blocked['scores'])}")
        if blocked.get("refused"):
            lines.append(f"  requests refused by this block: {blocked['refused']}")
    if story["rules"]:
        lines.append("")
        lines.append("rules that fired:")
        for r in story["rules"]:
            lines.append(f"  {r['rule']:<32} matched {r['matched']:>4}x, decided {r['decided']:>4}x, "
                         f"first {_iso(r['first'])}, last {_iso(r['last'])}")
    timeline = story["timeline"]
    if timeline:
        lines.append("")
        lines.append("timeline (seconds from the first decision):")
        t0 = timeline[0]["t"]
        shown = timeline if len(timeline) <= steps else [*timeline[:steps // 2], None, *timeline[-(steps // 2):]]
        for s in shown:
            if s is None:
                lines.append(f"  ... {len(timeline) - 2 * (steps // 2)} more ...")
                continue
            lines.append(f"  +{s['t'] - t0:8.2f}s  {s['action']:<8} {s['status']:>3}  {s['rule']:<28} "
                         f"{_fmt_scores(s['scores'])}")
    if story["unblock"]:
        lines.append("")
        lines.append("to unblock:")
        lines.extend(f"  {h}" for h in story["unblock"])
    return "\n".join(lines)


def _steps_from_capture(paths: Sequence[str], ident: str) -> tuple[str | None, list[DecisionEntry], Policy | None]:
    from guard_agent.tuning import read_capture
    from guard_agent.tuning.replay import policy_from_snapshot

    capture = read_capture(paths)
    session = ident if any(d.session == ident for d in capture.decisions) else next(
        (d.session for d in capture.decisions if d.request_id == ident), None)
    if session is None:
        return None, [], None
    mine = [d for d in capture.decisions if d.session == session]
    steps = [DecisionEntry(t=d.t, request_id=d.request_id, session=d.session, model=d.model, action=d.action,
                           rule=d.rule, status=d.status, enforced=d.enforced, scores=d.scores, matched=d.matched)
             for d in mine]
    revision = mine[-1].policy_revision
    snap = capture.policies.get(revision)
    return session, steps, policy_from_snapshot(snap) if snap is not None else None


def _policy_from_admin(args: argparse.Namespace, token: str) -> Policy | None:
    """The running guard's policy (for rule descriptions and cool-downs); None when it cannot be compiled."""
    import yaml

    from guard_agent.policy.loader import PolicyError, parse_policy

    answer = admin_get(args.admin, "/admin/policy", token, timeout=args.timeout)
    document = answer.get("document")
    if not isinstance(document, dict):
        return None
    try:
        return parse_policy(yaml.safe_dump(document, sort_keys=False), source="<running guard>").policy
    except PolicyError:
        return None


def _steps_from_admin(args: argparse.Namespace, ident: str, session: str | None
                      ) -> tuple[str | None, list[DecisionEntry], dict[str, Any] | None]:
    token = read_token(args)
    query = {"session": session} if session else {"session": ident}
    answer = admin_get(args.admin, "/admin/decisions/log", token, timeout=args.timeout, query=query)
    if not answer.get("decisions") and not answer.get("record") and session is None:
        answer = admin_get(args.admin, "/admin/decisions/log", token, timeout=args.timeout,
                           query={"request_id": ident})
    steps = [DecisionEntry.from_dict(e) for e in answer.get("decisions") or ()]
    sid = answer.get("session")
    return (str(sid) if sid else None), steps, answer.get("record")


def run(args: argparse.Namespace) -> int:
    if not args.capture and not args.admin:
        raise CommandError("give --capture PATH (captured decisions) and/or --admin URL")
    ident: str = args.id.strip()
    session: str | None = None
    steps: list[DecisionEntry] = []
    policy: Policy | None = None
    record: dict[str, Any] | None = None
    sources: list[str] = []
    try:
        if args.capture:
            session, steps, policy = _steps_from_capture(args.capture, ident)
            sources.append("capture")
        if args.admin:
            live_session, live, record = _steps_from_admin(args, ident, session)
            session = session or live_session
            if policy is None:
                policy = _policy_from_admin(args, read_token(args))
            seen = {s.request_id for s in steps}
            steps += [s for s in live if s.request_id not in seen]
            sources.append("admin")
    except AdminError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot read the capture: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CommandError(f"the admin API answered in an unexpected shape ({exc!r}); is the guard's version the "
                           "same as this command's?") from exc
    if session is None or (not steps and record is None):
        return error_line(args.command_prog, f"no session or request {ident!r} in {', '.join(sources)}", FAILED)
    story = build_story(session, steps, policy=policy, record=record, admin=args.admin, sources=sources)
    if args.json:
        print_json(story)
    else:
        print(format_story(story, steps=max(2, args.steps)))
    return OK
