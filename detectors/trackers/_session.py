"""SessionTrackers: runs every tracker over a session's stream; state lives only in SessionState.

Requests with more than ``max_rows_tracked`` rows (64) are tracked on that many rows, chosen by a
salted hash the client cannot predict; all rows count for volume and rate. This bounds the work per
request (about 70 us per tracked row for peek and update together with a warm global index, and about
170 us for a one-row request: ``bench/tracker_cost.py``).

Per distinct query (exact repeats of one of the last ``ring_exact`` rows only count for the rate: a
retry tells an attacker nothing new), each tracker turns an observation into a log-likelihood ratio
(benign model vs attack model) and accumulates it with CUSUM (see ``_evidence``):

- fingerprint: the stored fingerprints sharing >= match_fraction of hashes with the query (its
  near-duplicates in the session). None: benign evidence (benign P(none) = 1 - p0_near - 0.01, attack
  0.2). Near-duplicates all answered with the query's class: neutral (0), however many: clients resend
  edits of their own inputs and get the same answer. A near-duplicate answered with another class (the
  session's queries straddle the decision boundary, as HopSkipJump's and Boundary's probes do about half
  the time): benign 0.5 %, attack 30 %. Near-duplicates off the reference manifold (synthetic
  augmentation) count by number: 1-3 or >= 4 of them, benign (p0_near, 0.01), attack (0.3, 0.5).
- neighbors: mean whitened distance to the ``nn_k`` nearest of the last ``ring_nn`` queries below
  ``nn_threshold`` (the 1 % quantile of benign streams) *and* the query off the reference manifold
  (synthetic perturbations such as Jacobian augmentation) or off the integer lattice of integer-coded
  features (``_lattice``: a search in continuous space between the codes): benign ``p0_near``, attack 0.5;
  close neighbours on the manifold are neutral (natural edits), far ones benign evidence.
- coverage: (a) rare region, i.e. off-manifold (PCA residual or whitened norm beyond the 99.5 % quantile
  of the reference rows' out-of-sample ones) or a grid cell the reference hardly visits, benign rate
  ``p0_rare`` (twice the rate measured on held-out reference data), attack 0.9; (b) growth: a query in a cell
  the session has not visited, benign probability = reference mass of unvisited cells, attack probability
  halfway to 1.
- margin: top-1 minus top-2 probability below ``margin_threshold``, benign ``p0_margin``, attack 0.5.
- prada (every distinct query, as in the paper): at each Shapiro-Wilk check (at most one per request),
  W < prada_delta (calibrated per session on benign streams) has benign rate 1 %, attack rate 50 %.
- rate: a leaky bucket (``rate_leak`` queries/s allowance), not evidence, score 1 - 2^(-level/rate_half).
- crawl (``_crawl``, not evidence and not part of risk): region and class coverage like a natural crawl
  of as many rows, times a steep volume curve (0.5 at 1,000 distinct rows): natural-data extraction.
- risk: the maximum of every tracker's CUSUM, a CUSUM over ``global_fingerprint`` >= 0.8 events
  (benign 5 %: popular inputs edited by many clients; attack 90 %; when the caller passes the score)
  and a joint CUSUM of the summed per-query evidence. The maximum keeps an attack that only one
  tracker sees from being diluted by the others' benign evidence; the joint term lets several weak
  signals add up. Union bound: the false-alarm bound is
  at most 7 times a single tracker's.

All evidence decays with ``half_life`` seconds of wall time between updates.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _evidence as ev
from . import _hashing, _prada
from ._config import TrackerConfig
from ._crawl import CrawlScore
from ._features import Projector
from ._lattice import LatticeTest
from ._state import SessionState, decode, encode, encoded_size, new_state
from ._steps import StepTest

SCORE_NAMES = frozenset({"session.prada", "session.fingerprint", "session.neighbors", "session.coverage",
                         "session.margin", "session.rate", "session.risk", "session.crawl"})

_FP_ATTACK = (0.2, 0.3, 0.5)
_RARE_P1 = 0.9  # attack model for rare regions: a run of rare queries, not an occasional one
_GLOBAL_EVENT, _GLOBAL_P0, _GLOBAL_P1 = 0.8, 0.05, 0.9
# a query whose near-duplicates (or nearest neighbours) in the session were answered with another class: the
# search straddles the decision boundary. Benign clients resending edits of an input get the same answer
# (their clusters are stable); a boundary search gets both answers about half the time.
_FLIP_P0, _FLIP_P1 = 0.005, 0.3
# a query that is a recent query plus a dense step of one magnitude (``_steps``): none in 667,000 benign
# queries of the detection matrix, so 0.1 % is a conservative benign rate; Jacobian augmentation hits on about
# half of its augmented queries
_STEP_P0, _STEP_P1 = 0.001, 0.5
_DENSITY_CACHE = 4096  # fingerprints whose reference density is kept (about 1 MB)


class SessionTrackers:
    """Stateless engine over a fitted config; one instance serves every session."""

    score_names: frozenset[str] = SCORE_NAMES

    def __init__(self, config: TrackerConfig, *, salt: bytes) -> None:
        """``salt`` keys the fingerprint hashes; share it across replicas that share an index."""
        self.config = config
        self._keys = _hashing.derive_keys(salt, config.n_grids + config.window + 1)  # the last keys row_keys
        p_near = min(max(config.p0_near, 1e-4), 0.5)
        fp_benign = (1.0 - p_near - 0.01, p_near, 0.01)
        self._fp_llr = tuple(
            min(max(math.log(a / b), ev.LLR_MIN), ev.LLR_MAX) for a, b in zip(_FP_ATTACK, fp_benign, strict=True))
        self._nn_llr = ev.bernoulli_llr(config.p0_near, 0.5)
        self._flip_llr = ev.bernoulli_llr(_FLIP_P0, _FLIP_P1)
        self._step_llr = ev.bernoulli_llr(_STEP_P0, _STEP_P1)[0]
        self._rare_llr = ev.bernoulli_llr(config.p0_rare, _RARE_P1) if config.p0_rare > 0 else (0.0, 0.0)
        self._margin_llr = ev.bernoulli_llr(config.p0_margin, 0.5)
        self._prada_llr = ev.bernoulli_llr(0.01, 0.5)
        self._global_llr = ev.bernoulli_llr(_GLOBAL_P0, _GLOBAL_P1)
        self._coverage_on = config.p0_rare > 0 and config.grid_edges.shape[0] > 0
        self._nn_on = config.nn_threshold > 0
        self._crawl = CrawlScore(config.cell_probs if self._coverage_on else np.ones(1))
        # per-request constants, read once (a request is typically one row: call overhead is the cost)
        self._project = Projector(config)
        self._steps = StepTest(config)
        self._lattice = LatticeTest(config)
        self._hasher = _hashing.WindowHasher(config.center, config.quant_step, config.quant_offsets, config.window,
                                             self._keys)
        self._match_count = config.match_count
        self._cell_probs = config.cell_probs.tolist()
        self._row_key = int(self._keys[-1])
        self._ref_hashes, self._ref_ids = self._reference_table(config.ref_rows)
        # reference density by fingerprint: it depends on nothing else, and popular inputs come back
        self._density_cache: dict[tuple[bytes, float], float] = {}

    # ---- state -----------------------------------------------------------------------------------
    def new_state(self) -> SessionState:
        """An empty session."""
        return new_state(self.config)

    def encode(self, state: SessionState) -> bytes:
        """Compact fixed-size bytes (no pickle)."""
        return encode(self.config, state)

    def decode(self, data: bytes) -> SessionState:
        """Strict decode; raises ValueError on garbage or a state of another layout."""
        return decode(self.config, data)

    def state_nbytes(self, state: SessionState) -> int:
        """Bytes of the state's payload (equal to the encoded size; Python object overhead excluded)."""
        return encoded_size(self.config)

    # ---- scoring ---------------------------------------------------------------------------------
    def fingerprints(self, X: np.ndarray) -> np.ndarray:
        """Per-row salted bottom-N window hashes, shape (rows, n_hashes) uint64, 0 = padding."""
        return self._fingerprints(self._check(X))

    def _fingerprints(self, X: np.ndarray) -> np.ndarray:
        return _hashing.bottom_k(self._hasher(X), self.config.n_hashes)

    def request_hashes(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(fingerprints, row keys, digests)`` with X checked once. Fingerprints and row keys are of the
        *tracked* rows only (:meth:`tracked_rows`: all rows up to ``max_rows_tracked``, else a salted choice),
        so a large batch costs no more than ``max_rows_tracked`` rows; ``digests`` are the unsalted exact-row
        digests of every row, which :meth:`update` takes (a request's rows are hashed once)."""
        X = self._check(X)
        digests = _hashing.row_digest_ints(X)
        dig = np.array(digests, dtype=np.uint64)
        keep = self.tracked_rows(dig)
        if keep is None:
            return self._fingerprints(X), self._keys_of(digests), dig
        return self._fingerprints(X[keep]), self._keys_of([digests[i] for i in keep]), dig

    def tracked_rows(self, digests: np.ndarray) -> np.ndarray | None:
        """Indices of the rows the trackers look at when a request has more than ``max_rows_tracked`` rows (a
        choice keyed by the secret salt, so the client cannot hide probes among them), else None (all rows)."""
        if digests.shape[0] <= self.config.max_rows_tracked:
            return None
        keyed = _hashing.mix(digests ^ self._keys[0])
        return np.sort(np.argsort(keyed, kind="stable")[: self.config.max_rows_tracked])

    def _reference_table(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted hashes, reference row of each) over the reference sample's fingerprints."""
        if rows.shape[0] == 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        fps = self.fingerprints(rows)
        ids = np.repeat(np.arange(fps.shape[0]), fps.shape[1])
        flat = fps.ravel()
        keep = flat != 0
        order = np.argsort(flat[keep], kind="stable")
        return flat[keep][order], ids[keep][order]

    def reference_density(self, fingerprints: np.ndarray, match_threshold: float = 0.5) -> np.ndarray:
        """Per row, the share of the reference sample that are near-duplicates of it (same rule as the
        global index): how often benign inputs land this close to each other there. 0 without a sample."""
        fps = np.atleast_2d(fingerprints)
        n_ref = self.config.ref_rows.shape[0]
        out = np.zeros(fps.shape[0])
        if n_ref == 0:
            return out
        cache = self._density_cache
        for i, row in enumerate(fps):
            key = (row.tobytes(), match_threshold)
            known = cache.get(key)
            if known is None:
                known = self._row_density(row, match_threshold, n_ref)
                if len(cache) >= _DENSITY_CACHE:
                    del cache[next(iter(cache))]  # oldest first: popular inputs come back while still cached
                cache[key] = known
            out[i] = known
        return out

    def _row_density(self, row: np.ndarray, match_threshold: float, n_ref: int) -> float:
        """:meth:`reference_density` of one fingerprint."""
        nz = row[row != 0]
        if nz.size == 0:
            return 0.0
        lo = self._ref_hashes.searchsorted(nz, side="left")
        cnt = self._ref_hashes.searchsorted(nz, side="right") - lo
        need = max(1, math.ceil(match_threshold * nz.size))
        # a reference row holds each hash at most once, so it shares at most as many hashes with this row
        # as there are hashes found at all: fewer than needed means no near-duplicate
        if np.count_nonzero(cnt) < need:
            return 0.0
        # the reference rows of every hash found, concatenated: entries lo[j] .. lo[j] + cnt[j] - 1
        ends = np.cumsum(cnt)
        ids = self._ref_ids[np.arange(int(ends[-1])) + np.repeat(lo - (ends - cnt), cnt)]
        return float(np.count_nonzero(np.bincount(ids, minlength=n_ref) >= need) / n_ref)

    def row_keys(self, X: np.ndarray) -> np.ndarray:
        """Per-row salted 64-bit digests of the exact input bytes (exact repeats share one), never 0."""
        return self._keys_of(_hashing.row_digest_ints(self._check(X)))

    def _keys_of(self, digests: list[int]) -> np.ndarray:
        if len(digests) <= 4:
            key = self._row_key
            return np.array([_hashing.mix_int(d ^ key) | 1 for d in digests], dtype=np.uint64)
        return _hashing.mix(np.array(digests, dtype=np.uint64) ^ self._keys[-1]) | np.uint64(1)

    def peek(self, state: SessionState, now: float) -> dict[str, float]:
        """Scores as of the last update, decayed to ``now`` (never earlier than the last update)."""
        f = self._decay(state, now)
        cfg = self.config
        level = state.rate_level
        if math.isfinite(state.last_t):
            level = max(0.0, level - cfg.rate_leak * max(0.0, now - state.last_t))
        return {
            "session.prada": ev.to_score(state.s_prada * f),
            "session.fingerprint": ev.to_score(state.s_fingerprint * f),
            "session.neighbors": ev.to_score(state.s_neighbors * f),
            "session.coverage": ev.to_score(state.s_coverage * f),
            "session.margin": ev.to_score(state.s_margin * f),
            "session.rate": float(1.0 - 2.0 ** (-level / cfg.rate_half)),
            "session.risk": ev.to_score(self._risk(state) * f),
            "session.crawl": self._crawl.score(state.n_distinct, state.visited_mass,
                                               several_classes=self._crawl.active and _several_classes(state)),
        }

    def update(
        self,
        state: SessionState,
        X: np.ndarray,
        labels: np.ndarray | None,
        probabilities: np.ndarray | None,
        now: float,
        *,
        global_fingerprint: float | None = None,
        fingerprints: np.ndarray | None = None,
        digests: np.ndarray | None = None,
    ) -> tuple[SessionState, dict[str, float]]:
        """Feed a request's rows (and the model's answers) and return the new state and its scores.

        ``labels``: predicted class per row, or None (then argmax of ``probabilities``, else class 0).
        ``probabilities``: (rows, classes) model scores, or None (margin tracker then learns nothing).
        ``global_fingerprint``: optional score from GlobalFingerprintIndex.observe for this request;
        a value >= 0.8 counts as one cross-session near-duplicate event in ``session.risk``.
        ``fingerprints`` (of every row, or of the tracked rows only), ``digests`` (of every row):
        ``request_hashes(X)``'s first and last parts when the caller already
        computed them (saves the hashing; they must be of this very X).
        The input state is not modified.
        """
        return self.update_many([Update(state, X, labels, probabilities, now, global_fingerprint, fingerprints,
                                        digests)])[0]

    def update_many(self, requests: Sequence[Update]) -> list[tuple[SessionState, dict[str, float]]]:
        """:meth:`update` of several requests at once, each from the state it names (none sees another's
        rows): the guard feeds the requests of one event-loop turn together. Row-wise work runs once over
        all their rows, and each tracker compares the requests' n-th rows with their sessions' rings in one
        numpy call, so a request costs its share of the calls rather than all of them. Results are those of
        :meth:`update` alone, but for the last bit of a projection (BLAS sums a batch in another order),
        which no threshold is that close to."""
        feeds: list[_Feed] = []
        xs: list[np.ndarray] = []
        fps: list[np.ndarray] = []
        start = 0
        for request in requests:
            feed, X, fp = self._begin(request, start)
            feeds.append(feed)
            xs.append(X)
            fps.append(fp)
            start += X.shape[0]
        X = xs[0] if len(xs) == 1 else np.concatenate(xs)
        compact = _hashing.compact(fps[0] if len(fps) == 1 else np.concatenate(fps))
        if X.shape[0] <= 8:
            z, u, cells, rares = self._project.rows(X)
        else:
            feats = self._project(X)
            z, u, cells, rares = feats.z, feats.u, feats.cell.tolist(), feats.rare.tolist()
        rows = _Rows(compact, z, u, cells, rares, self._steps.standardise(X) if self._steps.active else None,
                     self._lattice.off(X))
        for wave in range(max((feed.rows for feed in feeds), default=0)):
            self._wave([feed for feed in feeds if feed.rows > wave], wave, rows)
        return [(feed.state, self.peek(feed.state, feed.state.last_t)) for feed in feeds]

    def _begin(self, request: Update, start: int) -> tuple[_Feed, np.ndarray, np.ndarray]:
        """A request's checks and per-request evidence (decay, rate, the global event): its feed, its tracked
        rows and their fingerprints."""
        X = self._check(request.X)
        cfg = self.config
        rows = X.shape[0]
        fingerprints, digests, now = request.fingerprints, request.digests, request.now
        if fingerprints is not None and fingerprints.shape not in ((rows, cfg.n_hashes),
                                                                   (min(rows, cfg.max_rows_tracked), cfg.n_hashes)):
            raise ValueError("fingerprints must have one row per input row, or per tracked row")
        if digests is not None and digests.shape != (rows,):
            raise ValueError("digests must have one entry per input row")
        lab = self._labels(request.labels, request.probabilities, rows)
        margins = self._margins(request.probabilities, rows)
        st = request.state.copy()
        dig = np.array(_hashing.row_digest_ints(X), dtype=np.uint64) if digests is None else digests
        keep = self.tracked_rows(dig)
        if keep is not None:
            # bounded work per request: a secret-keyed choice of rows the client cannot predict; the
            # rest count for volume and rate only
            st.n_queries += rows - keep.size
            st.n_distinct += rows - keep.size
            X, lab, dig = X[keep], lab[keep], dig[keep]
            if fingerprints is not None and fingerprints.shape[0] == rows:
                fingerprints = fingerprints[keep]
            margins = margins[keep] if margins is not None else None
        f = self._decay(st, now)
        dt = max(0.0, now - st.last_t) if math.isfinite(st.last_t) else 0.0
        st.s_fingerprint *= f
        st.s_neighbors *= f
        st.s_coverage *= f
        st.s_margin *= f
        st.s_prada *= f
        st.s_global *= f
        st.s_joint *= f
        st.rate_level = max(0.0, st.rate_level - cfg.rate_leak * dt) + rows
        if not math.isfinite(st.first_t):
            st.first_t = float(now)
        st.last_t = float(max(now, st.last_t)) if math.isfinite(st.last_t) else float(now)
        gf = request.global_fingerprint
        if gf is not None and math.isfinite(gf):
            st.s_global = ev.cusum(st.s_global, self._global_llr[0 if gf >= _GLOBAL_EVENT else 1])
        feed = _Feed(st, start, X.shape[0], lab.tolist(), None if margins is None else margins.tolist(),
                     dig.tolist())
        return feed, X, self._fingerprints(X) if fingerprints is None else fingerprints

    def _wave(self, feeds: list[_Feed], wave: int, rows: _Rows) -> None:
        """Row ``wave`` of each feed (distinct sessions): exact repeats only count; the ring comparisons of the
        others run together (``_Observations``), then each session's evidence is accumulated in order."""
        cfg = self.config
        fresh: list[_Feed] = []
        for feed in feeds:
            st = feed.state
            st.n_queries += 1
            digest = feed.digests[wave]
            if digest in st.exact[: st.n_exact].tolist():
                st.n_repeats += 1
                continue
            st.n_distinct += 1
            st.exact[st.head_exact] = digest
            st.head_exact = (st.head_exact + 1) % cfg.ring_exact
            st.n_exact = min(st.n_exact + 1, cfg.ring_exact)
            fresh.append(feed)
        if not fresh:
            return
        at = [feed.start + wave for feed in fresh]
        slots = [_prada.class_slot(cfg, feed.labels[wave]) for feed in fresh]
        seen = self._observe([feed.state for feed in fresh], at, slots, rows)
        for k, feed in enumerate(fresh):
            st, i, cls = feed.state, at[k], slots[k]
            off = rows.cells[i] == cfg.n_cells  # off the reference manifold (not merely a rarely visited cell)
            if rows.x16 is not None:
                self._steps.store(st, rows.x16[i])
            total = self._fingerprint_step(st, rows.fps[i], cls, off, seen.near[k], seen.flips[k])
            near_off = off or rows.lattice[i]  # off the manifold, or off the integer lattice (``_lattice``)
            total += self._neighbor_step(st, rows.z[i], cls, near_off, seen.stepped[k], seen.mean_k[k])
            total += self._coverage_step(st, rows.cells[i], rows.rares[i])
            if feed.margins is not None:
                llr = self._margin_llr[0 if feed.margins[wave] < cfg.margin_threshold else 1]
                st.s_margin = ev.cusum(st.s_margin, llr)
                total += llr
            w = _prada.apply(cfg, st, seen.zf[k], cls, seen.dmin[k], check_due=not feed.prada_checked)
            if w is not None:
                feed.prada_checked = True  # one PRADA check per request at most (see _prada)
                llr = self._prada_llr[0 if w < cfg.prada_delta else 1]
                st.s_prada = ev.cusum(st.s_prada, llr)
                total += llr
            st.s_joint = ev.cusum(st.s_joint, total)

    def _observe(self, states: list[SessionState], at: list[int], slots: list[int], rows: _Rows) -> _Observations:
        """What each tracker sees of one query per session against that session's rings (before the query
        joins them): one numpy call per step for all the sessions."""
        cfg = self.config
        n = len(states)
        idx: slice | np.ndarray = slice(at[0], at[0] + 1) if n == 1 else np.array(at)  # one session: a view
        slot = np.array(slots)
        stepped = [False] * n
        if rows.x16 is not None:
            stored, empty = _rings([st.steps for st in states], [st.n_steps for st in states])
            if stored.shape[1]:
                stepped = self._steps.hits(stored, empty, rows.x16[idx]).tolist()
        query = rows.fps[idx]
        near_count, flips = [0] * n, [0] * n
        stored, empty = _rings([st.fp for st in states], [st.n_fp for st in states])
        if stored.shape[1]:
            shared = _hashing.shared_counts_many(query, stored)
            near = shared >= np.minimum(self._match_count, np.add.reduce(query != 0, axis=1))[:, None]
            if empty is not None:
                near[empty] = False
            classes = _rings([st.fp_cls for st in states], [st.n_fp for st in states])[0]
            near_count = np.add.reduce(near, axis=1).tolist()
            flips = np.add.reduce(near & (classes != slot[:, None]), axis=1).tolist()
        mean_k: list[float | None] = [None] * n
        ready = [st.n_nn >= cfg.nn_k for st in states]
        if self._nn_on and any(ready):
            stored, empty = _rings([st.nn for st in states], [st.n_nn for st in states])
            diff = stored.astype(np.float64)
            diff -= rows.z[idx][:, None, :]
            diff *= diff
            d = np.sqrt(np.add.reduce(diff, axis=2))
            if empty is not None:
                d[empty] = np.inf
            nearest = np.partition(d, cfg.nn_k - 1, axis=1)[:, : cfg.nn_k]
            means = (np.add.reduce(nearest, axis=1) / cfg.nn_k).tolist()
            mean_k = [m if r else None for m, r in zip(means, ready, strict=True)]
        zf = _prada.stored_form(rows.u[idx])
        dmin = [math.inf] * n
        counts = [st.n_prada for st in states]
        if max(counts):
            stored, empty = _rings([st.prada_vec for st in states], counts)
            classes = _rings([st.prada_cls for st in states], counts)[0]
            dmin = _prada.nearest(stored, classes, empty, zf, slot).tolist()
        return _Observations(stepped, near_count, flips, mean_k, zf, dmin)

    def summary(self, state: SessionState) -> dict[str, float]:
        """Descriptive figures for events and operators (not scores): volume, cells, class entropy, W."""
        counts = state.cls_stats[:, 0]
        bits = np.unpackbits(state.cells)
        p = counts / counts.sum() if counts.sum() > 0 else counts
        ent = float(-np.sum(p[p > 0] * np.log(p[p > 0])))
        return {"queries": float(state.n_queries), "repeats": float(state.n_repeats),
                "cells_visited": float(bits.sum()), "accepted_class_entropy": ent,
                "prada_w": float(state.last_w),
                "duration_s": float(state.last_t - state.first_t) if math.isfinite(state.first_t) else 0.0}

    # ---- trackers --------------------------------------------------------------------------------
    def _fingerprint_step(self, st: SessionState, fp: np.ndarray, cls: int, off: bool, m: int, flips: int) -> float:
        """Accumulate near-duplicate evidence for this query and return it: near-duplicates answered with
        another class are attack evidence, and so are near-duplicates off the reference manifold (synthetic
        augmentation); on-manifold near-duplicates answered alike are neutral; none is benign evidence.
        ``m``: the query's near-duplicates in the session's ring, ``flips``: those answered with another class."""
        cfg = self.config
        if flips:
            llr = self._flip_llr[0]
        elif m:
            llr = self._fp_llr[1 if m < 4 else 2] if off else 0.0
        else:
            llr = self._fp_llr[0]
        st.s_fingerprint = ev.cusum(st.s_fingerprint, llr)
        st.fp[st.head_fp] = fp
        st.fp_cls[st.head_fp] = cls
        st.head_fp = (st.head_fp + 1) % cfg.ring_fp
        st.n_fp = min(st.n_fp + 1, cfg.ring_fp)
        return llr

    def _neighbor_step(self, st: SessionState, z: np.ndarray, cls: int, off: bool, stepped: bool,
                       mean_k: float | None) -> float:
        """Close neighbours among the recent queries: evidence when the query is also off the reference
        manifold (synthetic perturbations), neutral on it (clients resend edits of natural inputs; in the
        projection two natural inputs of different classes can be this close, so a class flip among
        neighbours is no evidence here: the fingerprint tracker looks for flips among input-space
        near-duplicates). ``stepped``: the query is a recent one plus a gradient-sign step (``_steps``),
        strong evidence of synthetic augmentation whatever its neighbours. ``mean_k``: the mean distance to
        the ``nn_k`` nearest recent queries (None: fewer stored). ``cls`` is kept with each neighbour."""
        cfg = self.config
        llr = 0.0
        if stepped:
            llr = self._step_llr
            st.s_neighbors = ev.cusum(st.s_neighbors, llr)
        elif self._nn_on and mean_k is not None:
            if mean_k >= cfg.nn_threshold:
                llr = self._nn_llr[1]
            elif off:
                llr = self._nn_llr[0]
            st.s_neighbors = ev.cusum(st.s_neighbors, llr)
        st.nn[st.head_nn] = np.minimum(np.maximum(z, -6.0e4), 6.0e4)
        st.nn_cls[st.head_nn] = cls
        st.head_nn = (st.head_nn + 1) % cfg.ring_nn
        st.n_nn = min(st.n_nn + 1, cfg.ring_nn)
        return llr

    def _coverage_step(self, st: SessionState, cell: int, rare: bool) -> float:
        if not self._coverage_on:
            return 0.0
        llr = self._rare_llr[0 if rare else 1]
        byte, bit = divmod(cell, 8)
        mask = 0x80 >> bit
        bits = int(st.cells[byte])
        seen = bool(bits & mask)
        if cell < self.config.n_cells:
            p0 = min(max(1.0 - st.visited_mass, 0.01), 0.99)
            p1 = p0 + 0.5 * (1.0 - p0)
            llr += math.log((1.0 - p1) / (1.0 - p0)) if seen else math.log(p1 / p0)
            if not seen:
                st.visited_mass = min(1.0, st.visited_mass + self._cell_probs[cell])
        st.cells[byte] = bits | mask
        st.s_coverage = ev.cusum(st.s_coverage, llr)
        return llr

    # ---- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _risk(st: SessionState) -> float:
        """Largest of the per-tracker CUSUMs and the joint one (generalised likelihood ratio over
        'one tracker is in attack mode' and 'all are'): an attack visible to a single tracker is not
        diluted by the others' benign evidence, and weak joint signals still add up."""
        return max(st.s_fingerprint, st.s_neighbors, st.s_coverage, st.s_margin, st.s_prada, st.s_global,
                   st.s_joint)

    def _decay(self, st: SessionState, now: float) -> float:
        if not math.isfinite(st.last_t):
            return 1.0
        return ev.decay_factor(now - st.last_t, self.config.half_life)

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.config.n_features:
            raise ValueError(f"X must have shape (rows, {self.config.n_features}), got {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X must be finite")
        return X

    @staticmethod
    def _labels(labels: np.ndarray | None, probabilities: np.ndarray | None, rows: int) -> np.ndarray:
        found = answer_labels(labels, probabilities, rows)
        return np.zeros(rows, dtype=np.int64) if found is None else found

    @staticmethod
    def _margins(probabilities: np.ndarray | None, rows: int) -> np.ndarray | None:
        if probabilities is None:
            return None
        pr = np.asarray(probabilities, dtype=np.float64).reshape(rows, -1)
        if not np.isfinite(pr).all():
            return None
        if pr.shape[1] == 1:
            return np.abs(2.0 * pr[:, 0] - 1.0)
        if rows == 1:  # the usual request: two Python floats, the same subtraction
            low, high = sorted(pr[0].tolist())[-2:]
            return np.array([high - low])
        top = np.sort(pr, axis=1)[:, -2:]
        return top[:, 1] - top[:, 0]


def _several_classes(st: SessionState) -> bool:
    """Whether the session's recent answers named two classes or more (``session.crawl`` needs them)."""
    recent = st.fp_cls[: st.n_fp]
    return bool(st.n_fp) and int(recent.min()) != int(recent.max())


def answer_labels(labels: np.ndarray | None, probabilities: np.ndarray | None, rows: int) -> np.ndarray | None:
    """The class answered for each row as int64, from the labels (string or float labels mapped to stable
    integers without Python's salted hash), else the argmax of the probabilities; None when the answer
    carried neither (then nothing can be learned about the decision boundary)."""
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != rows:
            raise ValueError("labels must have one entry per row")
        if lab.dtype.kind not in "iub":
            return np.array([int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=4).digest(), "little")
                             for v in lab], dtype=np.int64)
        return lab.astype(np.int64)
    if probabilities is not None:
        pr = np.asarray(probabilities, dtype=np.float64).reshape(rows, -1)
        return np.argmax(pr, axis=1) if pr.shape[1] > 1 else (pr[:, 0] >= 0.5).astype(np.int64)
    return None


@dataclass(frozen=True, slots=True)
class Update:
    """One request for :meth:`SessionTrackers.update_many`: the arguments of :meth:`SessionTrackers.update`."""

    state: SessionState
    X: np.ndarray
    labels: np.ndarray | None
    probabilities: np.ndarray | None
    now: float
    global_fingerprint: float | None = None
    fingerprints: np.ndarray | None = None
    digests: np.ndarray | None = None


@dataclass(slots=True)
class _Feed:
    """A request being fed: its new state, where its tracked rows start in the batch, how many there are,
    and per row the answered class, the margin and the exact digest."""

    state: SessionState
    start: int
    rows: int
    labels: list[int]
    margins: list[float] | None
    digests: list[int]
    prada_checked: bool = False


@dataclass(frozen=True, slots=True)
class _Rows:
    """The batch's row-wise quantities: compact fingerprints, projection, cell, rare flag, stored input, off
    the integer lattice (``_lattice``)."""

    fps: np.ndarray
    z: np.ndarray
    u: np.ndarray
    cells: list[int]
    rares: list[bool]
    x16: np.ndarray | None
    lattice: list[bool]


@dataclass(frozen=True, slots=True)
class _Observations:
    """Per query of a wave: gradient step found, near-duplicates and class flips among them, mean distance to
    the nearest neighbours (None: too few), the PRADA vector and its nearest member's distance (infinite: none)."""

    stepped: list[bool]
    near: list[int]
    flips: list[int]
    mean_k: list[float | None]
    zf: np.ndarray
    dmin: list[float]


def _rings(arrays: list[np.ndarray], counts: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The sessions' rings on a new first axis, cut to the fullest one's entries, and where a shorter one's
    slots are empty (None when none is: one session, or every ring as full)."""
    filled = max(counts)
    if len(arrays) == 1:
        one: np.ndarray = arrays[0][None, :filled]
        return one, None
    stacked = np.stack(arrays)[:, :filled]
    if min(counts) == filled:
        return stacked, None
    return stacked, np.arange(filled) >= np.array(counts)[:, None]
