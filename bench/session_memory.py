"""Memory of session-tracker state: can 100k live sessions fit in 1 GiB?

A SessionState has a fixed layout (ring buffers sized by the config), so a session that sent 10,000
queries takes exactly as much memory as one that sent 20. The benchmark fits a config on digits,
fills one state with 10,000 updates (every ring full), then holds N copies of it:

- as live ``SessionState`` objects (what the in-memory store keeps), and
- as encoded bytes (what Redis keeps, and what a store could keep to save memory),

and reports the resident-memory growth per session (from /proc/self/statm, after gc) and for N.

Run:  /work/venv/bin/python bench/session_memory.py [--sessions 100000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detectors.trackers import SessionTrackers, fit_tracker_config

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process in bytes."""
    gc.collect()
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000)
    args = ap.parse_args()
    n = args.sessions

    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    trackers = SessionTrackers(fit_tracker_config(X[:1200], y[:1200], seed=0), salt=os.urandom(16))
    rng = np.random.default_rng(0)
    state = trackers.new_state()
    t0 = time.perf_counter()
    for i in range(100):
        rows = np.clip(X[rng.integers(1200, len(X), size=100)] + rng.normal(0, 1, size=(100, 64)), 0, 16)
        state, _ = trackers.update(state, rows, rng.integers(10, size=100), None, float(i))
    per_row_us = (time.perf_counter() - t0) / 10_000 * 1e6
    blob = trackers.encode(state)
    print(f"state after {state.n_queries} queries: encoded {len(blob)} bytes "
          f"(state_nbytes {trackers.state_nbytes(state)}); update cost {per_row_us:.0f} us/row in 100-row batches")

    base = rss()
    encoded = [bytes(bytearray(blob)) for _ in range(n)]  # distinct objects, as a store would hold them
    enc_bytes = rss() - base
    live = [state.copy() for _ in range(n)]  # after the encoded ones: freed memory would hide growth
    live_bytes = rss() - base - enc_bytes
    del live, encoded

    gib = 1024**3
    for label, total in (("live SessionState", live_bytes), ("encoded bytes", enc_bytes)):
        print(f"{label:>18}: {total / n:7.0f} bytes/session, {n} sessions = {total / 2**20:7.1f} MiB "
              f"({100 * total / gib:.1f} % of 1 GiB)")


if __name__ == "__main__":
    main()
