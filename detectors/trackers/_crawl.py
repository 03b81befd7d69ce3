"""Crawl score: a session that walks the whole input space with the volume of a dataset.

Natural-data extraction sends inputs from the model's own distribution: each query is as ordinary as a
benign one, so no per-query evidence tells them apart. What a thief cannot avoid is the *crawl*: to copy
the model it must cover every region of the input space and every class, and keep going far beyond what
one client needs. Benign clients differ in one of the two: popular records, retries and edits stay in a
few regions; fresh-input clients cover the space but stop after tens to hundreds of rows.

``session.crawl`` multiplies the two:

- region coverage: the reference mass of the coverage-grid cells the session visited (state
  ``visited_mass``), divided by the mass a natural crawl of as many distinct rows is expected to visit
  (from the reference cell probabilities: ``sum_k p_k (1 - (1 - p_k) ** n)``), squared; while the recent
  answers named fewer than two classes the coverage counts as zero (a crawl of a classifier sees its classes);
- volume: ``1 - 2 ** (-(n / volume) ** 4)`` of the distinct rows ``n``: 0.5 at ``volume`` rows, 0.07 at
  half of it, 0.97 at 1.5 times it. The steep curve keeps any client below about half the volume at
  (nearly) zero, however it spreads its queries.

The state is the session's existing tracker state (distinct rows, visited mass, recent answered classes): the
score adds nothing to what a session stores. Without fitted cells (no profile) the score is 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CRAWL_VOLUME", "CrawlScore"]

CRAWL_VOLUME = 1000.0
"""Distinct rows at which a session that covers the input space like a natural crawl scores 0.5: far beyond
the benign clients of the detection matrix (at most 150 single rows, or 8 batches of 64 = 512 rows) and well
under what a thief sends to copy a model (thousands of rows)."""

_STEEPNESS = 4.0
_TABLE = 4096  # expected coverage is tabulated for 1..4096 rows; beyond that it is the last value


class CrawlScore:
    """``session.crawl`` from a session's distinct rows, visited reference mass and answered classes.

    Fitted once per tracker config from the reference cell probabilities (``TrackerConfig.cell_probs``)."""

    def __init__(self, cell_probs: np.ndarray, *, volume: float = CRAWL_VOLUME) -> None:
        """``cell_probs``: reference mass of each coverage cell (sums to about 1); one cell means no grid."""
        probs = np.asarray(cell_probs, dtype=np.float64).reshape(-1)
        if volume <= 0 or not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise ValueError("volume must be > 0 and cell probabilities finite and >= 0")
        self.volume = float(volume)
        self.active = probs.size > 1
        n = np.arange(1, _TABLE + 1, dtype=np.float64)[:, None]
        self._expected = (probs[None, :] * (1.0 - (1.0 - probs[None, :]) ** n)).sum(axis=1)

    def expected_mass(self, rows: int) -> float:
        """Reference mass of the cells a natural crawl of ``rows`` distinct rows is expected to visit."""
        if rows <= 0:
            return 0.0
        return float(self._expected[min(rows, _TABLE) - 1])

    def coverage(self, rows: int, visited_mass: float, *, several_classes: bool) -> float:
        """How much the session's spread looks like a natural crawl of as many rows, in [0, 1]."""
        if not self.active or rows <= 0 or not several_classes:
            return 0.0
        expected = self.expected_mass(rows)
        ratio = min(1.0, max(0.0, visited_mass) / expected) if expected > 0 else 0.0
        return ratio * ratio

    def score(self, rows: int, visited_mass: float, *, several_classes: bool) -> float:
        """``session.crawl`` in [0, 1]: coverage times the volume curve; ``several_classes``: the answers named
        two classes or more."""
        cov = self.coverage(rows, visited_mass, several_classes=several_classes)
        if cov == 0.0:
            return 0.0
        vol = 1.0 - 2.0 ** (-((rows / self.volume) ** _STEEPNESS))
        return float(cov * vol)
