"""The global near-duplicate fingerprint index on Redis: one attack spread over many keys *and* replicas.

Same algorithm and score scale as ``detectors.trackers.GlobalFingerprintIndex.observe``
(``1 - 2^(-m / m_half)``, m = distinct earlier inputs near the row from *other* sessions within
``window_s``; exact repeats of an input count once), run by one Lua script per request so that a
request's lookup and insertion are atomic across replicas:

- entries: a ring of ``max_entries`` string keys ``{prefix}ge:{slot}`` = session hash (8 bytes) + time
  (20 chars) + weight (10 digits: distinct inputs merged into this entry) + the fingerprint's
  non-zero hashes (8 bytes each), with TTL ``window_s``; a new input near a live entry is merged into
  the closest one, others get an entry of their own;
- buckets: each entry is filed under the ``n_index`` smallest of its hashes (mod ``n_buckets``) in
  ``{prefix}gb:{bucket // 64}`` hashes (field = bucket, value = the newest ``bucket_size`` slots), TTL
  ``window_s``; candidates from the buckets are verified by counting shared hashes;
- answers: ``{prefix}gl:{slot}`` = the entry's main class, its answers of that class and its answers of other
  classes (``main:n:k``), TTL ``window_s``; a row's near-duplicates count in proportion to the share of answers
  near it outside their main class (up to ``flip_share``, as in the in-memory index);
- exact-input digests (salted, 8 bytes): a ring of ``max_entries`` keys ``{prefix}gd:{slot}`` and
  ``{prefix}gd:m:{group}`` hashes (digest -> time last seen); overwriting a ring slot removes its digest.

Memory is bounded by ``max_entries`` (``GUARD_GLOBAL_MAX_ENTRIES``) entries and digests plus the buckets:
``bench/session_store.py`` measured 12 MiB of Redis memory for 100k entries. An entry lives ``window_s``
from its creation; merges raise its weight but keep its time and TTL. Keys are computed inside the
script: standalone Redis or Sentinel, not Redis Cluster. At most ``max_rows`` rows of a request go to
Redis (those with the smallest salted row keys), which bounds how long one script blocks the server.
Redis down or slow: the replica's own in-memory index answers (it mirrors every query) and the call is
counted; entries seen during an outage are not pushed to Redis (they age out within ``window_s`` anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from detectors.trackers import GlobalFingerprintIndex, session_hash
from guard_agent.sessions.redis.link import FALLBACK, RedisLink

__all__ = ["RedisGlobalIndex"]

_GROUP = 64

# ARGV: 1 prefix, 2 now (20 chars), 3 window_s, 4 session hash (8 bytes), 5 max_entries, 6 bucket_size,
# 7 ttl seconds, 8 current volume bin, 9 number of bins, 10 flip_share, then per row: need, fingerprint (packed
# non-zero hashes), bucket ids (comma separated), row digest (8 bytes), digest group, reference density.
# Returns the best discounted count as a string (Lua numbers would be truncated to integers).
# Entry value: session hash (8) + time (20) + weight (10, distinct inputs merged into it) + fingerprint.
_OBSERVE = """
local prefix, tnow = ARGV[1], ARGV[2]
local oldest = tonumber(tnow) - tonumber(ARGV[3])
local sid, max_entries, bsize, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local best = 0
local gep, gbp, gdp, gwp, glp = prefix .. 'ge:', prefix .. 'gb:', prefix .. 'gd:', prefix .. 'gw:', prefix .. 'gl:'
local bin, nbins, flip_share = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
-- W: distinct inputs within the window, from per-bin counters
local wkeys = {}
for k = 0, nbins - 1 do wkeys[#wkeys + 1] = gwp .. tostring(bin - k) end
local volume = 0
for _, v in ipairs(redis.call('MGET', unpack(wkeys))) do
  if v then volume = volume + tonumber(v) end
end
local i = 11
while i + 5 <= #ARGV do
  local need, fp, blist, digest, dgroup = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local density = tonumber(ARGV[i + 5])
  i = i + 6
  -- exact repeats of an input count once and score nothing: a ring of max_entries digests, by group
  local gmap = gdp .. 'm:' .. dgroup
  local last = redis.call('HGET', gmap, digest)
  local repeat_ = last and tonumber(last) >= oldest
  if not last then
    local dslot = tostring((redis.call('INCR', gdp .. 'h') - 1) % max_entries)
    redis.call('EXPIRE', gdp .. 'h', ttl)
    local old = redis.call('GET', gdp .. dslot)
    if old then redis.call('HDEL', gdp .. 'm:' .. string.sub(old, 10), string.sub(old, 1, 8)) end
    redis.call('SET', gdp .. dslot, digest .. ':' .. dgroup)  -- no TTL: the ring itself bounds it
  end
  redis.call('HSET', gmap, digest, tnow)
  redis.call('EXPIRE', gmap, ttl)
  if not repeat_ then
    redis.call('INCR', gwp .. tostring(bin))
    redis.call('EXPIRE', gwp .. tostring(bin), 2 * ttl)
  end
  if not repeat_ then
    local mine = {}
    for p = 1, #fp, 8 do mine[string.sub(fp, p, p + 7)] = true end
    local buckets, seen = {}, {}
    local merge_slot, merge_entry, merge_shared, m = nil, nil, -1, 0
    -- the answers near this row: per main class of an entry, its answers of that class, and all others
    -- (gl:{slot} = 'class:answers of it:answers of other classes')
    local answers, flips, labelled = {}, 0, false
    for b in string.gmatch(blist, '%d+') do
      buckets[#buckets + 1] = b
      local cell = redis.call('HGET', gbp .. math.floor(tonumber(b) / 64), b)
      if cell then
        for slot in string.gmatch(cell, '%d+') do
          if not seen[slot] then
            seen[slot] = true
            local e = redis.call('GET', gep .. slot)
            if e and #e > 38 and tonumber(string.sub(e, 9, 28)) >= oldest then
              local shared = 0
              for p = 39, #e, 8 do
                if mine[string.sub(e, p, p + 7)] then shared = shared + 1 end
              end
              if shared >= need then
                if string.sub(e, 1, 8) ~= sid then m = m + tonumber(string.sub(e, 29, 38)) end
                local known = redis.call('GET', glp .. slot)
                if known then
                  local label, same, other = string.match(known, '^([^:]+):(%d+):(%d+)$')
                  if label then  -- anything else (another release's format) is no answer
                    answers[label] = (answers[label] or 0) + tonumber(same)
                    flips = flips + tonumber(other)
                    labelled = true
                  end
                end
                -- the closest entry; ties go to the lowest slot, as in the in-memory index
                if shared > merge_shared or (shared == merge_shared and tonumber(slot) < tonumber(merge_slot)) then
                  merge_slot, merge_entry, merge_shared = slot, e, shared
                end
              end
            end
          end
        end
      end
    end
    if m > 0 then  -- in proportion to the answers outside the main class, up to flip_share of them
      local total, top = flips, 0
      for _, v in pairs(answers) do
        total = total + v
        if v > top then top = v end
      end
      if labelled and total > 0 then m = m * math.min(1, (total - top) / (total * flip_share)) else m = 0 end
    end
    m = m / (1 + volume * density)
    if m > best then best = m end
    if #fp > 0 then
      if merge_slot then
        local weight = tonumber(string.sub(merge_entry, 29, 38)) + 1
        -- the entry keeps its creation time and TTL: it counts for one window, merges do not extend it
        redis.call('SET', gep .. merge_slot, string.sub(merge_entry, 1, 28) .. string.format('%010d', weight)
          .. string.sub(merge_entry, 39), 'KEEPTTL')
      else
        local slot = tostring((redis.call('INCR', prefix .. 'gh') - 1) % max_entries)
        redis.call('EXPIRE', prefix .. 'gh', ttl)
        redis.call('SET', gep .. slot, sid .. tnow .. string.format('%010d', 1) .. fp, 'EX', ttl)
        redis.call('DEL', glp .. slot)  -- a reused slot starts without answers
        for _, b in ipairs(buckets) do
          local gk = gbp .. math.floor(tonumber(b) / 64)
          local cell = redis.call('HGET', gk, b)
          local out, n = slot, 1
          if cell then
            for s in string.gmatch(cell, '%d+') do
              if n >= bsize then break end
              if s ~= slot then out = out .. ',' .. s; n = n + 1 end
            end
          end
          redis.call('HSET', gk, b, out)
          redis.call('EXPIRE', gk, ttl)
        end
      end
    end
  end
end
return tostring(best)
"""

# ARGV: 1 prefix, 2 now, 3 window_s, 4 ttl seconds, then per row: need, fingerprint, bucket ids, class.
# Files each row's class with the closest live entry (ties to the lowest slot, as in the in-memory index):
# gl:{slot} = 'main class:answers of it:answers of other classes'; the main class is the one answered most
# (exact for two classes: when the others outnumber it, the last one answered takes its place).
_LEARN = """
local prefix = ARGV[1]
local oldest = tonumber(ARGV[2]) - tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local gep, gbp, glp = prefix .. 'ge:', prefix .. 'gb:', prefix .. 'gl:'
local i = 5
while i + 3 <= #ARGV do
  local need, fp, blist, label = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local mine, seen = {}, {}
  for p = 1, #fp, 8 do mine[string.sub(fp, p, p + 7)] = true end
  local best_slot, best_shared = nil, -1
  for b in string.gmatch(blist, '%d+') do
    local cell = redis.call('HGET', gbp .. math.floor(tonumber(b) / 64), b)
    if cell then
      for slot in string.gmatch(cell, '%d+') do
        if not seen[slot] then
          seen[slot] = true
          local e = redis.call('GET', gep .. slot)
          if e and #e > 38 and tonumber(string.sub(e, 9, 28)) >= oldest then
            local shared = 0
            for p = 39, #e, 8 do
              if mine[string.sub(e, p, p + 7)] then shared = shared + 1 end
            end
            if shared >= need and (shared > best_shared or
                (shared == best_shared and tonumber(slot) < tonumber(best_slot))) then
              best_slot, best_shared = slot, shared
            end
          end
        end
      end
    end
  end
  if best_slot then
    local main, same, other = string.match(redis.call('GET', glp .. best_slot) or '', '^([^:]+):(%d+):(%d+)$')
    if not main then
      redis.call('SET', glp .. best_slot, label .. ':1:0', 'EX', ttl)
    else
      same, other = tonumber(same), tonumber(other)
      if main == label then
        same = same + 1
      else
        other = other + 1
        if other > same then main, same, other = label, other, same end
      end
      redis.call('SET', glp .. best_slot, main .. ':' .. same .. ':' .. other, 'KEEPTTL')
    end
  end
end
return 1
"""

_DIGEST_GROUPS = 1024


class RedisGlobalIndex:
    """``session.global_fingerprint`` across replicas; the local index answers when Redis does not."""

    def __init__(self, link: RedisLink, *, local: GlobalFingerprintIndex | None = None,
                 max_entries: int = 100_000, bucket_size: int | None = None, max_rows: int = 8) -> None:
        """Parameters not given here are the local index's, so both speak on one scale. ``max_rows``: rows
        of one request checked against Redis (a script blocks Redis while it runs; each row costs up to
        ``n_index * bucket_size`` lookups), those with the smallest salted row keys of a larger batch (padding
        a probe behind benign rows does not keep it out); the local index sees them all."""
        self.link = link
        self.local = local if local is not None else GlobalFingerprintIndex()
        self.max_entries = int(max_entries)
        self.max_rows = int(max_rows)
        self.bucket_size = int(bucket_size or self.local.bucket_size)
        self.window_s = self.local.window_s
        self.match_threshold = self.local.match_threshold
        self.n_index = self.local.n_index
        self.m_half = self.local.m_half
        self.n_buckets = 1 << max(4, math.ceil(math.log2(max(1, max_entries * self.n_index // self.bucket_size) * 2)))
        self._script: Any = None
        self._learn_script: Any = None

    def _args(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, density: np.ndarray,
              now: float) -> list[Any]:
        sid = int(session_hash(session)).to_bytes(8, "little")
        args: list[Any] = [self.link.prefix, f"{now:20.6f}"[:20], repr(self.window_s), sid, self.max_entries,
                           self.bucket_size, max(1, math.ceil(self.window_s)),
                           math.floor(now / (self.window_s / self.local.volume_bins)), self.local.volume_bins,
                           repr(self.local.flip_share)]
        fps = np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))
        dig = np.asarray(digests, dtype=np.uint64).reshape(-1)
        dens = np.asarray(density, dtype=np.float64).reshape(-1)
        rows = self._selected(fps, dig)
        for row, digest, rho in zip(fps[rows], dig[rows], dens[rows], strict=True):
            nz = np.sort(row[row != 0])
            if nz.size == 0:
                continue
            buckets = np.unique(nz[: self.n_index] % np.uint64(self.n_buckets))
            need = max(1, math.ceil(self.match_threshold * nz.size))
            args += [need, nz.astype("<u8").tobytes(), ",".join(str(int(b)) for b in buckets),
                     int(digest).to_bytes(8, "little"), int(digest) % _DIGEST_GROUPS, repr(max(0.0, float(rho)))]
        return args

    async def observe(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, now: float,
                      density: np.ndarray | Callable[[int], float] | None = None) -> float:
        """Insert the request's rows; the score of its row with most near-duplicate inputs elsewhere."""
        # mirror: the fallback stays warm
        local = float(self.local.observe(session, fingerprints, digests, now, density))
        rows = np.atleast_2d(fingerprints).shape[0]
        if density is None:
            density = np.zeros(rows)
        elif callable(density):  # the script needs every row's value up front
            density = np.array([density(i) for i in range(rows)])
        args = self._args(session, fingerprints, digests, density, now)
        if len(args) == 10:
            return local
        result = await self.link.run("global", lambda c: self._observe_script(c)(args=args, client=c))
        if result is FALLBACK:
            return local
        remote = self.local.score(float(result))  # type: ignore[arg-type]
        # Redis checks at most max_rows rows of a batch; the local mirror saw every row: both are lower bounds
        return max(local, remote)

    def _selected(self, fingerprints: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Rows sent to Redis: all up to ``max_rows``, else those with the smallest salted row keys."""
        dig = np.asarray(keys, dtype=np.uint64).reshape(-1)
        rows = np.arange(np.atleast_2d(fingerprints).shape[0])
        if rows.size > self.max_rows:  # a choice the client cannot steer
            rows = np.sort(np.argsort(dig, kind="stable")[: self.max_rows])
        return rows

    async def learn(self, session: str, fingerprints: np.ndarray, digests: np.ndarray, labels: np.ndarray,
                    now: float) -> None:
        """The model's answers for the rows ``observe`` saw (``GlobalFingerprintIndex.learn``), locally and on
        Redis for the same rows ``observe`` sent there; Redis down or slow: the local mirror has them."""
        self.local.learn(fingerprints, labels, now, digests)
        fps = np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))
        labs = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labs.shape[0] != fps.shape[0]:
            return
        args: list[Any] = [self.link.prefix, f"{now:20.6f}"[:20], repr(self.window_s), max(1, math.ceil(self.window_s))]
        for i in self._selected(fps, digests).tolist():
            nz = np.sort(fps[i][fps[i] != 0])
            if nz.size == 0:
                continue
            buckets = np.unique(nz[: self.n_index] % np.uint64(self.n_buckets))
            args += [max(1, math.ceil(self.match_threshold * nz.size)), nz.astype("<u8").tobytes(),
                     ",".join(str(int(b)) for b in buckets), str(max(0, int(labs[i])))]
        if len(args) > 4:
            await self.link.run("global", lambda c: self._learn(c)(args=args, client=c))

    def _learn(self, client: Any) -> Any:
        if self._learn_script is None:
            self._learn_script = client.register_script(_LEARN)
        return self._learn_script

    def _observe_script(self, client: Any) -> Any:
        if self._script is None:
            self._script = client.register_script(_OBSERVE)
        return self._script
