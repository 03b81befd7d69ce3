"""Session trackers: per-session evidence of model extraction and query-based black-box attacks.

Pure library (numpy/scipy only, no clock, no I/O). Usage::

    cfg = fit_tracker_config(X_ref, y_ref, seed=0)
    trackers = SessionTrackers(cfg, salt=secret)
    state = trackers.new_state()
    state, scores = trackers.update(state, X, predicted_labels, probabilities, now)

Score scale: every ``session.*`` score except ``session.rate`` is ``1 - 2 ** (-(S / ln(1e6)) ** 2)`` of a
CUSUM statistic S in nats; 0.5 means the per-session false-alarm bound (1,000 benign queries) is 0.1 %,
0.8 means 7e-7 and 0.95 means 3e-10 (see ``_evidence``).
``session.rate`` is ``1 - 2 ** (-level / rate_half)`` of a leaky bucket.
``session.global_fingerprint`` (GlobalFingerprintIndex.observe) is ``1 - 2 ** (-m / 8)`` of the number
m of distinct near-duplicate earlier inputs from other sessions (exact repeats count once).

Suggested thresholds (flag / harden / block):

- ``session.risk``: 0.5 / 0.8 / 0.95 (the one to enforce on; it combines all trackers)
- ``session.fingerprint``, ``session.neighbors``, ``session.coverage``, ``session.prada``: 0.5 / 0.8 / 0.95
- ``session.margin``: 0.8 / 0.95 / none (boundary probing alone is weak evidence)
- ``session.rate``: 0.5 / 0.8 / 0.95 (throttle rather than block)
- ``session.global_fingerprint``: 0.5 / 0.8 / 0.95 (per query; a spread attack's queries cross it)
- ``session.crawl`` (``_crawl``: coverage like a natural crawl times volume, 0.5 at 1,000 distinct rows):
  harden at 0.5 (the copy then learns the top class only, rounded), no block (heavy benign users may crawl too)
"""

from ._config import TrackerConfig
from ._crawl import CRAWL_VOLUME, CrawlScore
from ._evidence import S_HALF, from_score, to_score
from ._fit import fit_tracker_config
from ._global import GlobalFingerprintIndex, session_hash
from ._session import SCORE_NAMES, SessionTrackers, Update, answer_labels
from ._state import SessionState

__all__ = [
    "CRAWL_VOLUME",
    "SCORE_NAMES",
    "S_HALF",
    "CrawlScore",
    "GlobalFingerprintIndex",
    "SessionState",
    "SessionTrackers",
    "TrackerConfig",
    "Update",
    "answer_labels",
    "fit_tracker_config",
    "from_score",
    "session_hash",
    "to_score",
]
