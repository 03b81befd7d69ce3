"""GlobalFingerprintIndex: near-duplicate queries across all sessions, bounded by ``max_entries``.

Catches one attack spread over many API keys: each key alone may send too few near-duplicates, but
together they form a tight cluster. For each row the score counts m, the number of *distinct earlier
inputs* from other sessions within ``window_s`` seconds whose fingerprints share at least
``match_threshold`` of the row's hashes, and maps it to ``1 - 2^(-m / m_half)``.

What is counted, and why:

- Exact repeats of an input (same bytes, recognised by a salted row digest the caller passes) are
  counted once, whoever sends them: many clients sending the same public input is not an attack signal.
  A repeat also scores 0 itself: it tells its sender nothing new, and scoring it would let anyone who
  seeds near-copies of a popular input get the clients who send that input verbatim blocked.
- Distinct near-duplicate inputs all count. Query-based attacks (HopSkipJump, Boundary) perturb an
  input by less than a quantisation step, so many of their queries share one fingerprint, and their
  clusters hold hundreds of queries; an earlier version stored identical fingerprints once and kept
  only the newest ``bucket_size`` candidates per bucket, which undercounted these clusters several-fold.
  Now a new input that is a near-duplicate of a live entry is merged into the closest one, whose
  weight (distinct inputs it stands for) grows; only inputs unlike every live entry are stored. An
  entry lives ``window_s`` from its creation (merges do not extend it), so a weight only ever counts
  inputs that arrived within one window: a slowly but steadily edited popular input does not add up
  over hours. Clusters stay a few entries whatever their size, so the candidate cap does not
  bound the count, and an attack flood does not evict the rest of the index.
- Only entries first stored by *another* session count (a session's own near-duplicates are the
  per-session tracker's job); an entry's weight may include rows of several sessions.
- Only clusters whose answers straddle the decision boundary count, in proportion to how much they do.
  After the model answered, ``learn`` files each row's class with the entry it joined: per entry, its main
  class (the one answered most), the answers of that class and the answers of any other. For a row, the
  answers filed with its near-duplicates give a share q of answers outside the largest class, and m is
  multiplied by ``min(1, q / flip_share)``. A boundary search (HopSkipJump's gradient probes, Boundary's
  steps) gets the other answer for a third to a half of its probes (q >= ``flip_share``, counted in full);
  many clients asking about one popular input, edited or not, get one answer (q = 0: such a cluster never
  counts, however many clients send it) or, for a popular input near the boundary, one answer but for a
  few flips (q of 1-5 % at 600 benign sessions per model, ``bench/detection_matrix.py``: counted at a
  twentieth to a fifth; counted in full, such clusters blocked 12 % of a small random forest's benign
  sessions: ``docs/detection.md``). Exact repeats are answered too and are filed as answers (a
  popular input sent verbatim is answered the same each time): a prober who pads its search with exact
  repeats of one class lowers q, at the cost of more queries than the search itself (the per-session
  trackers and the rate limit see every one).

Dense benign regions: where benign inputs crowd (smooth image patches, coarse tabular values), many
distinct benign inputs are near-duplicates of each other, more so the more traffic there is. The
caller passes each row's reference density (the share of a reference sample near it); m is divided by
``1 + W * density``, W being the distinct inputs seen in the window, i.e. by one plus the count benign
traffic of this volume would put there. Attack queries around one input are near no reference row
(density 0) and keep their full count.

An attacker who is blocked and opens a new key is recognised by the same count: the new key's first
query lands in the cluster the earlier keys built, for as long as it is inside the window.

Entries live in a ring (oldest overwritten first); a bucketed table over the ``n_index`` smallest
hashes of each fingerprint finds candidates (the newest ``bucket_size`` per bucket), which are verified
by counting shared hashes. Row digests live in a second ring of ``max_entries`` slots. Memory: about
``max_entries * (8 * n_hashes + 68) + 8 * max_entries * n_index / bucket_size * 2`` bytes plus a dict of
up to ``max_entries`` digests, e.g. ~85 MB for 200k entries of 20 hashes (measured). Share the SessionTrackers salt
across replicas.

Known weakness: many benign clients sending slightly different copies of one popular input that lies on
the decision boundary itself (the model answers each class for a quarter or more of the copies) form a
cluster that counts in full too; ``m_half`` sets how many distinct copies per ``window_s`` it takes to alert.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np

#: time bins over the window for the traffic volume W
VOLUME_BINS = 64
#: share of answers outside the main class at which a row's near-duplicates count fully
FLIP_SHARE = 0.25
_TRUE = np.ones(1, dtype=bool)
# hash membership table of ``_shared``: 2**11 slots keep 20 hashes apart in most bit ranges; bit 0 of a
# window hash is always 1, so ranges start at bit 1
_SLOT_BITS = 11
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_SHIFTS = (1, 12, 23, 34, 45, 53)
_TABLE_MAX_VALUES = 64
_SLOT_MASK_U64 = np.uint64(_SLOT_MASK)
_ONES: dict[int, np.ndarray] = {}
#: recently observed distinct rows whose entry ``learn`` finds without a lookup (requests in flight, recent repeats)
_FILED_MAX = 4096


class GlobalFingerprintIndex:
    """In-memory index shared by all sessions of one process."""

    volume_bins: int = VOLUME_BINS

    def __init__(
        self,
        *,
        max_entries: int = 200_000,
        match_threshold: float = 0.5,
        window_s: float = 600.0,
        n_index: int = 8,
        bucket_size: int = 16,
        m_half: float = 8.0,
        flip_share: float = FLIP_SHARE,
    ) -> None:
        """``match_threshold``: share of a fingerprint's hashes two queries must have in common. ``flip_share``:
        the share of a row's near-duplicate answers outside their main class at which the near-duplicates count
        fully (fewer count in proportion)."""
        if (max_entries < 1 or not 0.0 < match_threshold <= 1.0 or n_index < 1 or bucket_size < 1 or m_half <= 0
                or not window_s > 0 or not 0.0 < flip_share <= 1.0):
            raise ValueError("invalid GlobalFingerprintIndex parameters")
        self.flip_share = float(flip_share)
        self.max_entries = int(max_entries)
        self.match_threshold = float(match_threshold)
        self.window_s = float(window_s)
        self.n_index = int(n_index)
        self.m_half = float(m_half)
        self.bucket_size = int(bucket_size)
        n_buckets = 1 << max(4, math.ceil(math.log2(max(1, max_entries * n_index // bucket_size) * 2)))
        self._table = np.full((n_buckets, bucket_size), -1, dtype=np.int32)
        self._bucket_mask = np.uint64(n_buckets - 1)  # n_buckets is a power of two
        self._bucket_head = np.zeros(n_buckets, dtype=np.uint8)
        self._fps: np.ndarray | None = None
        self._session = np.zeros(self.max_entries, dtype=np.uint64)
        self._time = np.full(self.max_entries, -np.inf)
        self._weight = np.zeros(self.max_entries, dtype=np.float64)
        # the class first answered for an input of the entry (-1: none yet), how many answers were of that
        # class and how many of another: clusters answered with two classes straddle the decision boundary
        self._label = np.full(self.max_entries, -1, dtype=np.int64)
        self._same = np.zeros(self.max_entries, dtype=np.float64)  # answers of the first class
        self._flips = np.zeros(self.max_entries, dtype=np.float64)  # answers of any other class
        self._head = 0
        self._count = 0
        # distinct inputs per time bin (``VOLUME_BINS`` bins over the window): the traffic volume W
        self._bin_count = np.zeros(VOLUME_BINS)
        self._bin_id = np.full(VOLUME_BINS, -1, dtype=np.int64)
        # exact-input dedup: digest -> time last seen, evicted in insertion order through a ring
        self._digests: dict[int, float] = {}
        self._digest_ring = np.zeros(self.max_entries, dtype=np.uint64)
        self._digest_head = 0
        # row digest -> (entry, its serial) that ``observe`` filed the row with, for the last ``_FILED_MAX`` distinct
        # rows: ``learn`` files the answer there without a lookup, also for exact repeats of a recent row
        self._filed: dict[int, tuple[int, int]] = {}
        self._serial = np.zeros(self.max_entries, dtype=np.int64)  # per entry: how many were stored before it
        self._stored = 0

    def __len__(self) -> int:
        """Number of stored fingerprints."""
        return self._count

    def score(self, m: float) -> float:
        """The score for m near-duplicate earlier inputs."""
        return float(1.0 - 2.0 ** (-m / self.m_half))

    def straddle(self, answers: dict[int, float], flips: float) -> float:
        """How much a row's near-duplicates count, from the answers given near it: the share of answers
        outside the main class over ``flip_share``, at most 1; 0 when all were one class. ``answers``: per
        class, the answers filed with entries first answered with it; ``flips``: answers of another class
        than their entry's first."""
        total = sum(answers.values()) + flips
        if not answers or total <= 0.0:
            return 0.0
        return min(1.0, (total - max(answers.values())) / (total * self.flip_share))

    def volume(self, now: float) -> float:
        """W: distinct inputs stored or merged within the window (up to one bin's width of slack)."""
        current = math.floor(now / (self.window_s / VOLUME_BINS))
        return float(self._bin_count[self._bin_id > current - VOLUME_BINS].sum())

    def _count_input(self, now: float) -> None:
        current = math.floor(now / (self.window_s / VOLUME_BINS))
        slot = current % VOLUME_BINS
        if self._bin_id[slot] != current:
            self._bin_id[slot], self._bin_count[slot] = current, 0.0
        self._bin_count[slot] += 1.0

    def observe(self, session_id: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                density: np.ndarray | Callable[[int], float] | None = None) -> float:
        """Insert the request's rows and return ``session.global_fingerprint`` for the row with the most
        near-duplicate earlier inputs of other sessions. ``digests``: one salted digest per row
        (``SessionTrackers.row_keys``), which recognises exact repeats. ``density``: per row (an array, or a
        function of the row index, called only for rows with near-duplicates), the share of the reference
        sample near it (``SessionTrackers.reference_density``); m is divided by
        ``1 + W * density``, W the distinct inputs in the window: where benign inputs are dense, many
        near-duplicates are expected from volume alone."""
        fps = np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))
        dig = np.asarray(digests, dtype=np.uint64).reshape(-1)
        density_of = _density_lookup(density, fps.shape[0])
        if dig.shape[0] != fps.shape[0]:
            raise ValueError("one digest per fingerprint row is needed")
        if self._fps is None:
            self._fps = np.zeros((self.max_entries, fps.shape[1]), dtype=np.uint64)
        if fps.shape[1] != self._fps.shape[1]:
            raise ValueError("fingerprint width differs from the index's")
        sid = session_hash(session_id)
        best = 0.0
        oldest = now - self.window_s
        volume: float | None = None  # W as of this call's start: computed when first needed
        last = fps.shape[0] - 1
        for i, (row, digest) in enumerate(zip(fps, dig.tolist(), strict=True)):
            keys_all = np.sort(row)
            n_nz = int(np.count_nonzero(keys_all))
            if n_nz == 0:
                continue
            keys_all = keys_all[keys_all.size - n_nz :]  # the zeros (padding) sort first
            if self._seen_recently(digest, now):
                continue  # an exact repeat tells nobody anything new: it neither scores nor counts
            buckets = (keys_all[: self.n_index] & self._bucket_mask).astype(np.int64)  # == % n_buckets
            slots = self._table[buckets].ravel()
            slots = slots[slots >= 0]
            merge = -1
            if slots.size:
                slots.sort()
                cand = slots[np.concatenate((_TRUE, slots[1:] != slots[:-1]))]  # == np.unique
                shared = _shared(self._fps[cand], keys_all)
                need = max(1, math.ceil(self.match_threshold * n_nz))
                # near-duplicates within the window are few (merged clusters): visit them one by one, in
                # candidate order; the weights are whole numbers, so their sum is exact in any order
                m, top = 0.0, -1
                answers: dict[int, float] = {}  # class -> answers near this row (first class of each entry)
                flips = 0.0  # answers near this row of another class than their entry's first
                for j in np.flatnonzero(shared >= need).tolist():
                    c = int(cand[j])
                    if self._time[c] >= oldest:
                        if shared[j] > top:  # the first candidate sharing the most hashes
                            top, merge = int(shared[j]), c
                        if self._session[c] != sid:
                            m += float(self._weight[c])
                        label = int(self._label[c])
                        if label >= 0:
                            answers[label] = answers.get(label, 0.0) + float(self._same[c])
                            flips += float(self._flips[c])
                if m > 0.0:
                    m *= self.straddle(answers, flips)
                if m > 0.0:
                    r = max(0.0, density_of(i))  # needed only here: rows with no match never pay for it
                    if r > 0.0 and volume is None:
                        volume = self.volume(now)
                    best = max(best, m / (1.0 + (volume if volume is not None else 0.0) * r))
            if volume is None and i < last:
                volume = self.volume(now)  # before this call's own inputs change the bins
            self._count_input(now)
            if merge >= 0:
                self._weight[merge] += 1.0  # the entry keeps its creation time: it counts for one window
            else:
                merge = self._insert(row, buckets, sid, now)
            self._file(digest, merge)
        return self.score(best)

    def _file(self, digest: int, slot: int) -> None:
        if len(self._filed) >= _FILED_MAX:
            del self._filed[next(iter(self._filed))]  # the oldest
        self._filed[digest] = (slot, int(self._serial[slot]))

    def learn(self, fingerprints: np.ndarray, labels: np.ndarray, now: float,
              digests: np.ndarray | None = None) -> None:
        """The model's answers (one class per fingerprint row) for rows ``observe`` saw: each is filed with the
        entry ``observe`` merged the row (or the row it exactly repeats) into or stored it as, found again by the
        row's ``digests`` (the ones ``observe`` got) when given, recent and that entry still lives; else the live
        entry closest to the fingerprint. That entry counts the answers of its main class
        and of any other; when the others outnumber the main class, the class just answered becomes the main
        one (exact for two classes, the boundary a search straddles). ``observe`` counts a row's
        near-duplicates in proportion to the share of these answers outside the largest class (``straddle``).
        Labels must be non-negative (``answer_labels``)."""
        fps = np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))
        labs = np.asarray(labels, dtype=np.int64).reshape(-1)
        if self._fps is None or fps.shape[1] != self._fps.shape[1] or labs.shape[0] != fps.shape[0]:
            return
        keys = [None] * fps.shape[0] if digests is None else np.asarray(digests, dtype=np.uint64).reshape(-1).tolist()
        if len(keys) != fps.shape[0]:
            raise ValueError("one digest per fingerprint row is needed")
        oldest = now - self.window_s
        for row, label, digest in zip(fps, labs.tolist(), keys, strict=True):
            filed = self._filed.get(digest) if digest is not None else None
            if filed is not None and self._serial[filed[0]] == filed[1] and self._time[filed[0]] >= oldest:
                c = filed[0]
            else:
                c = self._closest_live(row, oldest)
                if c < 0:
                    continue
            if self._label[c] < 0:
                self._label[c] = max(0, label)
                self._same[c] = 1.0
            elif self._label[c] != label:
                self._flips[c] += 1.0
                if self._flips[c] > self._same[c]:  # the main class is the one answered most (exact for two)
                    self._label[c] = label
                    self._same[c], self._flips[c] = self._flips[c], self._same[c]
            else:
                self._same[c] += 1.0

    def _closest_live(self, row: np.ndarray, oldest: float) -> int:
        """The live entry sharing the most hashes with ``row`` (the first on ties), or -1."""
        assert self._fps is not None
        keys_all = np.sort(row)
        n_nz = int(np.count_nonzero(keys_all))
        if n_nz == 0:
            return -1
        keys_all = keys_all[keys_all.size - n_nz :]
        buckets = (keys_all[: self.n_index] & self._bucket_mask).astype(np.int64)
        slots = self._table[buckets].ravel()
        slots = np.unique(slots[slots >= 0])
        if not slots.size:
            return -1
        shared = _shared(self._fps[slots], keys_all)
        live = (shared >= max(1, math.ceil(self.match_threshold * n_nz))) & (self._time[slots] >= oldest)
        if not live.any():
            return -1
        return int(slots[np.flatnonzero(live)[int(np.argmax(shared[live]))]])

    def _seen_recently(self, digest: int, now: float) -> bool:
        """Whether this exact input was seen within the window; records it either way."""
        last = self._digests.get(digest)
        if last is not None and last >= now - self.window_s:
            self._digests[digest] = now
            return True
        if last is None:
            old = int(self._digest_ring[self._digest_head])
            if old and old != digest:
                self._digests.pop(old, None)
            self._digest_ring[self._digest_head] = digest
            self._digest_head = (self._digest_head + 1) % self.max_entries
        self._digests[digest] = now
        return False

    def _insert(self, row: np.ndarray, buckets: np.ndarray, sid: np.uint64, now: float) -> int:
        """Store ``row`` as a new entry (overwriting the oldest); return its slot."""
        assert self._fps is not None
        slot = self._head
        self._fps[slot] = row
        self._session[slot] = sid
        self._time[slot] = now
        self._weight[slot] = 1.0
        self._serial[slot] = self._stored
        self._stored += 1
        self._label[slot] = -1
        self._same[slot] = self._flips[slot] = 0.0
        self._head = (self._head + 1) % self.max_entries
        self._count = min(self._count + 1, self.max_entries)
        width = self._table.shape[1]
        for b in sorted(set(buckets.tolist())):
            h = int(self._bucket_head[b])
            self._table[b, h] = slot
            self._bucket_head[b] = (h + 1) % width
        return slot


def _density_lookup(density: np.ndarray | Callable[[int], float] | None, rows: int) -> Callable[[int], float]:
    """Row index -> reference density, from an array (one per row), a function of the row index (evaluated
    only for rows that have near-duplicates), or None (0 everywhere)."""
    if density is None:
        return lambda _i: 0.0
    if callable(density):
        return density
    values = np.asarray(density, dtype=np.float64).reshape(-1)
    if values.shape[0] != rows:
        raise ValueError("one density per fingerprint row is needed")
    return lambda i: float(values[i])


def _shared(stored: np.ndarray, sorted_row: np.ndarray) -> np.ndarray:
    """Per stored fingerprint, how many of the (sorted, non-zero) row's hashes it holds; padding zeros
    never match.

    Looked up in a small direct-address table: ``_SLOT_BITS`` bits of each hash (a bit range where the row's
    hashes do not collide) pick a slot that holds the row's hash with those bits, or a value that cannot be
    there; a stored hash is in the row exactly when its slot holds it. Branch-free, faster than a binary
    search per stored hash (the fallback, when no bit range separates the row's hashes). Matches are
    counted per stored fingerprint by a product with ones (exact: small integers in float64), which is
    quicker than a reduction along the short axis."""
    values = sorted_row.tolist()
    n = len(set(values))
    found = None
    for shift in _SHIFTS if n <= _TABLE_MAX_VALUES else ():
        slots = [(v >> shift) & _SLOT_MASK for v in values]
        if len(set(slots)) == n:
            table = np.zeros(_SLOT_MASK + 1, dtype=np.uint64)
            table[slots] = sorted_row
            if 0 not in slots:
                table[0] = 1 << shift  # its own slot is 1: a stored 0 (padding, slot 0) never matches it
            found = table.take((stored >> np.uint64(shift)) & _SLOT_MASK_U64) == stored
            break
    if found is None:
        idx = sorted_row.searchsorted(stored)
        np.minimum(idx, sorted_row.size - 1, out=idx)
        found = sorted_row.take(idx) == stored
    counts: np.ndarray = (found @ _ones(found.shape[1])).astype(np.intp)
    return counts


def _ones(width: int) -> np.ndarray:
    ones = _ONES.get(width)
    if ones is None:
        ones = _ONES[width] = np.ones(width)
        ones.flags.writeable = False
    return ones


def session_hash(session_id: str) -> np.uint64:
    """64-bit id of a session for the index (never the session string itself)."""
    return np.uint64(int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(), "little"))
