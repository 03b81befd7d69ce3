"""``guard-agent selftest --target URL``: a bounded red-team test of a running guard, one line per defence.

Sends at most ``--max-requests`` Open Inference Protocol v2 requests within
``--time-limit`` seconds, each check under its own random API key (``X-API-Key``):
benign reference rows (must be answered), OOD inputs (must be refused), a
black-box evasion attack (HopSkipJump from the ``[attack]`` extra) and a
Jacobian-augmentation extraction attack (both must be refused, 403, before their
budget ends). The attacks are the attack benchmark's (``guard_agent.attacks``).
Exit 0 when every defence passes, 1 when one fails, 2 when the test cannot run.
Attack sessions stay blocked for the policy's cool-down: run it against a
deployment, not with a key real clients use.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from guard_agent.commands._convention import FAILED, OK, CommandError, add_json_argument, print_json

__all__ = ["add_arguments", "format_results", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the guard's URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", default="digits", help="model name in the inference route (default digits)")
    parser.add_argument("--data", help="benign reference rows (.npy or numeric CSV, as for `fit`); "
                                       "default: sklearn's digits, the demo model's data")
    parser.add_argument("--max-requests", dest="max_requests", type=int, default=400,
                        help="upper bound on requests for the whole test (default 400)")
    parser.add_argument("--time-limit", dest="time_limit", type=float, default=120.0,
                        help="upper bound on seconds for the whole test (default 120)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="requests per second per check, under the policy's rate limit (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the test traffic (default 0)")
    add_json_argument(parser, "one result per defence")


def _data(path: str | None) -> np.ndarray:
    if path is None:
        from sklearn.datasets import load_digits

        X: np.ndarray = load_digits().data.astype(np.float64)
        return X
    from detectors import load_reference

    return np.asarray(load_reference(path)[0], dtype=np.float64)


def format_results(results: list[object]) -> str:
    from guard_agent.selftest import CheckResult

    rows = [r for r in results if isinstance(r, CheckResult)]
    header = f"{'defence':<28} {'result':<6} {'requests':>8} {'refused':>7}  detail"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.defence:<28} {'PASS' if r.passed else 'FAIL':<6} {r.requests:>8} {r.refused:>7}  "
                     f"{r.detail}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from guard_agent.selftest import SelftestConfig, run_checks

    if args.max_requests < 20 or args.time_limit <= 0 or args.rate <= 0:
        raise CommandError("--max-requests must be >= 20, --time-limit and --rate > 0")
    progress = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON document only
    try:
        data = _data(args.data)
        cfg = SelftestConfig(target=args.target, model=args.model, data=data, max_requests=args.max_requests,
                             time_limit=args.time_limit, rate=args.rate, seed=args.seed)
        started = time.monotonic()
        print(f"selftest against {args.target} (model {args.model}; at most {args.max_requests} requests, "
              f"{args.time_limit:g} s)", file=progress, flush=True)
        results = run_checks(cfg, progress=lambda m: print(f"  {m}", file=progress, flush=True))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from exc
    passed = OK if all(r.passed for r in results) else FAILED
    if args.json:
        print_json([dataclasses.asdict(r) for r in results])
        return passed
    print()
    print(format_results(list(results)))
    total = sum(r.requests for r in results)
    print(f"\n{sum(r.passed for r in results)}/{len(results)} defences passed; {total} requests in "
          f"{time.monotonic() - started:.1f} s")
    return passed
