"""``guard-agent fit``: a detector profile from reference data (the work is in ``guard_agent.fit_command``)."""

from __future__ import annotations

import argparse

from guard_agent.fit_command import add_fit_arguments, run_fit

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Fit a detector profile on reference data: the detectors, their calibration and the "
                          "session trackers, written to a directory GUARD_PROFILE points at.")
    add_fit_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_fit(args)
