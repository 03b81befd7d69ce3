"""PRADA (Juuti et al., EuroS&P 2019) with bounded memory.

Per predicted class, a growing set of accepted queries; each new query's minimum L2 distance to its
class's set joins the pooled distances; it is accepted into the set when that distance exceeds
``max(T, mean - std)`` of the class's accepted distances. Every ``prada_every`` queries once more than
``prada_min_pool`` distances were pooled, Shapiro-Wilk runs on the pool (3-sigma outliers dropped) and
an alarm is raised when W < delta. Natural queries give roughly normal distances; synthetic ones
(perturbations of a few seeds) give a spike near zero plus far points.

At most one check runs per request (``check_due``): the checks due within one batch test nearly the same
sample, all arriving at once, and a CUSUM counting each of a 64-row request's six as fresh evidence blocked a
benign batch client whose pool dipped once (``bench/detection_matrix.py``, integer-coded data). A stream of
one row per request is checked as before.

Bounds and their effect: distances are taken in a 24-dimensional random (JL) projection of the
centred input when it has more features (distances preserved within roughly +-30 %); all classes
share one FIFO ring of ``ring_prada`` accepted vectors, so once full a class's set forgets its oldest
members and minimum distances are over-estimated (slightly larger, so slightly more acceptances); the
test runs on the most recent ``ring_pool`` distances, a sliding window, so a slow attack diluted by
older natural traffic is seen later, and the false-alarm rate stays what ``prada_delta`` was
calibrated for whatever the session's length. Exact repeats are not fed to PRADA (distance 0 says
nothing); near-duplicates are, as in the paper.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from ._config import TrackerConfig
from ._state import SessionState

# scipy's shapiro without its axis/NaN-policy decorator (same computation for one finite 1-D sample)
_shapiro = getattr(stats.shapiro, "__wrapped__", stats.shapiro)


def class_slot(cfg: TrackerConfig, label: int) -> int:
    """Map any class id to one of the bounded per-class slots."""
    return int(label) % cfg.n_class_slots


def shapiro_w(pool: np.ndarray) -> float:
    """Shapiro-Wilk W after dropping 3-sigma outliers; 1.0 when the test cannot run.

    The mean and standard deviation are numpy's own formulas written out (one sum shared, the same
    operations in the same order, so the same bits), and the test is scipy's ``shapiro`` without its
    axis/NaN-policy wrapper (input here is one finite 1-D sample, for which the wrapper only adds ~40 us)."""
    d = pool[np.isfinite(pool)].astype(np.float64)
    n = d.size
    if n >= 3:
        mu = float(np.add.reduce(d) / n)  # == d.mean()
        x = d - mu
        x *= x
        sd = math.sqrt(float(np.add.reduce(x) / n))  # == d.std()
        if sd > 0:
            d = d[np.abs(d - mu) <= 3.0 * sd]
    if d.size < 3 or float(d.max() - d.min()) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = float(_shapiro(d).statistic)
    return w if math.isfinite(w) else 1.0


def step(cfg: TrackerConfig, st: SessionState, z: np.ndarray, slot: int, *, check_due: bool = True) -> float | None:
    """Process one query (mutates ``st``); return W when a Shapiro-Wilk check ran, else None. ``check_due``:
    False once this request had its check (the query is pooled all the same)."""
    zf = stored_form(z[None])
    n = st.n_prada
    dmin = nearest(st.prada_vec[None, :n], st.prada_cls[None, :n], None, zf, np.array([slot]))[0] if n else math.inf
    return apply(cfg, st, zf[0], slot, dmin, check_due=check_due)


def stored_form(u: np.ndarray) -> np.ndarray:
    """Queries as the growing sets keep them (float16 precision), as float64."""
    out: np.ndarray = u.astype(np.float16).astype(np.float64)
    return out


def nearest(vecs: np.ndarray, classes: np.ndarray, empty: np.ndarray | None, zf: np.ndarray,
            slots: np.ndarray) -> np.ndarray:
    """For several sessions at once, each query's distance to the nearest member of its class's growing set
    (infinite when the set is empty): ``vecs`` (sessions, ring, dim) and ``classes`` (sessions, ring) the rings,
    ``empty`` (sessions, ring) their slots holding no vector yet (None: all hold one), ``zf`` (sessions, dim)
    :func:`stored_form` queries."""
    diff = vecs.astype(np.float64)
    diff -= zf[:, None, :]
    diff *= diff
    d2 = np.add.reduce(diff, axis=2)
    others = classes != slots[:, None]
    if empty is not None:
        others |= empty
    d2[others] = np.inf
    out: np.ndarray = np.sqrt(d2.min(axis=1))
    return out


def apply(cfg: TrackerConfig, st: SessionState, zf: np.ndarray, slot: int, dmin: float, *,
          check_due: bool = True) -> float | None:
    """:func:`step` with the nearest member's distance ``dmin`` known (infinite: none); mutates ``st``."""
    found = dmin < math.inf
    if found:
        if dmin == 0.0:
            # an exact repeat of an accepted query older than the session's exact-repeat ring (a batch client
            # re-scoring its records): distance 0 says nothing, and a pool of zeros would look synthetic
            return None
        st.pool[st.head_pool] = min(dmin, 6.0e4)
        st.head_pool = (st.head_pool + 1) % cfg.ring_pool
        st.n_pool = min(st.n_pool + 1, cfg.ring_pool)
        st.n_pool_total += 1
        cnt, s1, s2 = st.cls_stats[slot].tolist()
        mean = s1 / cnt if cnt > 0 else 0.0
        sd = math.sqrt(max(s2 / cnt - mean * mean, 0.0)) if cnt > 1 else 0.0
        accept = dmin > max(cfg.prada_min_threshold, mean - sd)
        if accept:
            st.cls_stats[slot] = (cnt + 1.0, s1 + dmin, s2 + dmin * dmin)
    else:
        accept = True
    if accept:
        st.prada_vec[st.head_prada] = zf
        st.prada_cls[st.head_prada] = slot
        st.head_prada = (st.head_prada + 1) % cfg.ring_prada
        st.n_prada = min(st.n_prada + 1, cfg.ring_prada)
    if check_due and found and st.n_pool_total > cfg.prada_min_pool and st.n_pool_total % cfg.prada_every == 0:
        st.last_w = shapiro_w(st.pool[: st.n_pool])
        return st.last_w
    return None
