"""``guard-agent check``: validate policy files without running the guard."""

from __future__ import annotations

import argparse
import sys

from guard_agent.commands._convention import FAILED, OK, add_json_argument, print_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Validate policy files without running the guard: YAML syntax, every section's fields and types, rule "
        "ids, actions, score and property names, operators, thresholds (scores lie in [0, 1]), CIDRs, "
        "per-model overrides. Prints the revision the guard would stamp on its events; exits 1 with "
        "file:line: field: message on the first error of each file.")
    parser.add_argument("policy", nargs="+", help="policy file(s) or directories holding policy.yaml")
    add_json_argument(parser, "one result per policy")


def run(args: argparse.Namespace) -> int:
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

