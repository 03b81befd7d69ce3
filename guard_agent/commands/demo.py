"""``guard-agent demo``: the guard in front of a built-in model, benign and abusive traffic, the decisions."""

from __future__ import annotations

import argparse
import asyncio

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " Exits within a minute."
    parser.add_argument("--verbose", action="store_true", help="also print every decision event")


def run(args: argparse.Namespace) -> int:
    from guard_agent.demo import run_demo

    return asyncio.run(run_demo(verbose=args.verbose))
