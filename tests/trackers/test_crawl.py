"""session.crawl: a natural-data crawl scores high, benign traffic shapes (fresh, popular, retries, batches) low."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.trackers import CRAWL_VOLUME, CrawlScore, SessionTrackers

from .conftest import Digits


def _feed(trackers: SessionTrackers, digits: Digits, requests: list[np.ndarray]) -> float:
    """Send each request (a row block) with the model's answers; session.crawl after the last one."""
    state = trackers.new_state()
    for i, rows in enumerate(requests):
        state, _ = trackers.update(state, rows, digits.model.predict(rows), digits.model.predict_proba(rows),
                                   float(i))
    return trackers.peek(state, float(len(requests)))["session.crawl"]


def _natural(digits: Digits, n: int, seed: int) -> np.ndarray:
    """Held-out rows with 5 % noise, drawn with replacement: the matrix's natural-data thief."""
    rng = np.random.default_rng(seed)
    base = digits.X_held[rng.integers(len(digits.X_held), size=n)]
    return np.clip(base + rng.normal(0.0, 0.05, base.shape) * digits.X_ref.std(axis=0), 0, 16)


class TestCrawlScore:
    def test_volume_curve(self) -> None:
        """A full-coverage session scores 0.5 at the crawl volume, nearly 0 at half of it, near 1 at twice."""
        crawl = CrawlScore(np.full(16, 1 / 16))
        assert crawl.score(int(CRAWL_VOLUME), 1.0, several_classes=True) == pytest.approx(0.5, abs=0.01)
        assert crawl.score(int(CRAWL_VOLUME) // 2, 1.0, several_classes=True) < 0.07
        assert crawl.score(2 * int(CRAWL_VOLUME), 1.0, several_classes=True) > 0.99

    def test_needs_coverage_and_classes(self) -> None:
        """Volume alone is not a crawl: little visited mass, one class, or no grid give (nearly) zero."""
        crawl = CrawlScore(np.full(16, 1 / 16))
        assert crawl.score(3000, 1 / 16, several_classes=True) < 0.01
        assert crawl.score(3000, 1.0, several_classes=False) == 0.0
        assert CrawlScore(np.ones(1)).score(3000, 1.0, several_classes=True) == 0.0

    def test_expected_mass_grows_to_one(self) -> None:
        """A natural crawl's expected visited mass grows with rows and reaches about all of the reference."""
        probs = np.random.default_rng(0).dirichlet(np.ones(64))
        crawl = CrawlScore(probs)
        masses = [crawl.expected_mass(n) for n in (1, 10, 100, 1000, 10_000)]
        assert masses == sorted(masses)
        assert masses[0] == pytest.approx(float(np.sum(probs**2)))
        assert masses[-1] > 0.99

    def test_rejects_bad_parameters(self) -> None:
        """A non-positive volume or negative cell mass is refused."""
        with pytest.raises(ValueError, match="volume must be > 0"):
            CrawlScore(np.ones(4) / 4, volume=0)
        with pytest.raises(ValueError, match="volume must be > 0"):
            CrawlScore(np.array([0.5, -0.5]))


class TestCrawlInSessions:
    def test_natural_crawl_scores_high(self, trackers: SessionTrackers, digits: Digits) -> None:
        """2,000 natural rows one at a time (a thief copying the model) cross the harden threshold 0.5."""
        assert _feed(trackers, digits, [r[None] for r in _natural(digits, 2000, 1)]) >= 0.9

    def test_natural_crawl_in_batches_scores_high(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Batching the crawl (64 rows a request) does not hide it."""
        rows = _natural(digits, 2048, 2)
        assert _feed(trackers, digits, [rows[i : i + 64] for i in range(0, 2048, 64)]) >= 0.9

    def test_benign_shapes_score_low(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Fresh clients (150 rows), batch clients (8 x 64 rows), popular records and retries stay under 0.1."""
        rng = np.random.default_rng(3)
        held = digits.X_held
        fresh = [held[i][None] for i in rng.permutation(len(held))[:150]]
        batch = [held[rng.integers(len(held), size=64)] for _ in range(8)]
        popular_rows = held[rng.choice(len(held), 10, replace=False)]
        popular = [np.clip(popular_rows[rng.integers(10)] + rng.normal(0, 0.5, 64), 0, 16)[None] for _ in range(600)]
        retry: list[np.ndarray] = []
        for i in rng.permutation(len(held))[:100]:
            retry += [held[i][None], held[i][None], np.clip(held[i] + rng.normal(0, 0.3, 64), 0, 16)[None]]
        for shape in (fresh, batch, popular, retry):
            assert _feed(trackers, digits, shape) < 0.1

    def test_one_answered_class_is_no_crawl(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A crawl whose answers carry one class only (or none the guard can read) scores 0: it copies nothing."""
        state = trackers.new_state()
        for i, row in enumerate(_natural(digits, 1500, 4)):
            state, _ = trackers.update(state, row[None], np.zeros(1, dtype=np.int64), None, float(i))
        assert trackers.peek(state, 1500.0)["session.crawl"] == 0.0
