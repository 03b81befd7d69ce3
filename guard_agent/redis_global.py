"""The global near-duplicate fingerprint index on Redis: one attack spread over many keys *and* replicas.

Same algorithm and score scale as ``detectors.trackers.GlobalFingerprintIndex.observe``
(``1 - 2^(-m / m_half)``, m = earlier near-duplicates of the row from *other* sessions within
``window_s``; identical fingerprints are neither stored twice nor counted), run by one Lua script per
request so that a request's lookup and insertion are atomic across replicas:

- entries: a ring of ``max_entries`` string keys ``{prefix}ge:{slot}`` = session hash (8 bytes) + time
  (20 chars) + the fingerprint's non-zero hashes (8 bytes each), with TTL ``window_s``;
- buckets: each entry is filed under the ``n_index`` smallest of its hashes (mod ``n_buckets``) in
  ``{prefix}gb:{bucket // 64}`` hashes (field = bucket, value = the newest ``bucket_size`` slots), TTL
  ``window_s``; candidates from the buckets are verified by counting shared hashes.

Memory is bounded: about ``max_entries * ~280`` bytes of entries plus ``n_buckets * ~32`` bytes of
buckets (~50 MB at the default 100k entries). Keys are computed inside the script: standalone Redis or
Sentinel, not Redis Cluster. At most ``max_rows`` rows of a request go to Redis (the first ones of a
larger batch), which bounds how long one script blocks the server. Redis down or slow: the replica's own
in-memory index answers (it mirrors every query) and the call is counted; entries seen during an outage
are not pushed to Redis (they age out within ``window_s`` anyway).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from detectors.trackers import GlobalFingerprintIndex
from guard_agent.sessions.redis_store import FALLBACK, RedisLink

__all__ = ["RedisGlobalIndex"]

_GROUP = 64

# ARGV: 1 prefix, 2 now (20 chars), 3 window_s, 4 session hash (8 bytes), 5 max_entries, 6 bucket_size,
# 7 ttl seconds, then per row: need, fingerprint (packed non-zero hashes), bucket ids (comma separated).
_OBSERVE = """
local prefix, tnow = ARGV[1], ARGV[2]
local oldest = tonumber(tnow) - tonumber(ARGV[3])
local sid, max_entries, bsize, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local best = 0
local gep, gbp = prefix .. 'ge:', prefix .. 'gb:'
local i = 8
while i + 2 <= #ARGV do
  local need, fp, blist = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  local mine = {}
  for p = 1, #fp, 8 do mine[string.sub(fp, p, p + 7)] = true end
  local buckets, seen = {}, {}
  local identical, m = false, 0
  for b in string.gmatch(blist, '%d+') do
    buckets[#buckets + 1] = b
    local cell = redis.call('HGET', gbp .. math.floor(tonumber(b) / 64), b)
    if cell then
      for slot in string.gmatch(cell, '%d+') do
        if not seen[slot] then
          seen[slot] = true
          local e = redis.call('GET', gep .. slot)
          if e then
            if #e == #fp + 28 and string.sub(e, 29) == fp then
              identical = true
            elseif string.sub(e, 1, 8) ~= sid and tonumber(string.sub(e, 9, 28)) >= oldest then
              local shared = 0
              for p = 29, #e, 8 do
                if mine[string.sub(e, p, p + 7)] then shared = shared + 1 end
              end
              if shared >= need then m = m + 1 end
            end
          end
        end
      end
    end
  end
  if m > best then best = m end
  if not identical and #fp > 0 then
    local slot = tostring((redis.call('INCR', prefix .. 'gh') - 1) % max_entries)
    redis.call('EXPIRE', prefix .. 'gh', ttl)
    redis.call('SET', gep .. slot, sid .. tnow .. fp, 'EX', ttl)
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
return best
"""


class RedisGlobalIndex:
    """``session.global_fingerprint`` across replicas; the local index answers when Redis does not."""

    def __init__(self, link: RedisLink, *, local: GlobalFingerprintIndex | None = None,
                 max_entries: int = 100_000, bucket_size: int | None = None, max_rows: int = 8) -> None:
        """Parameters not given here are the local index's, so both speak on one scale. ``max_rows``: rows
        of one request checked against Redis (a script blocks Redis while it runs; each row costs up to
        ``n_index * bucket_size`` lookups), the first ones of a larger batch; the local index sees them all."""
        self.link = link
        self.local = local if local is not None else GlobalFingerprintIndex()
        self.max_entries = int(max_entries)
        self.max_rows = int(max_rows)
        table = getattr(self.local, "_table", None)  # the local index's bucket width (not public there)
        self.bucket_size = int(bucket_size or (table.shape[1] if table is not None else 16))
        self.window_s = self.local.window_s
        self.match_threshold = self.local.match_threshold
        self.n_index = self.local.n_index
        self.m_half = self.local.m_half
        self.n_buckets = 1 << max(4, math.ceil(math.log2(max(1, max_entries * self.n_index // self.bucket_size) * 2)))
        self._script: Any = None

    def install(self, tracking: Any) -> None:
        """Make ``tracking.observe_global`` (the SessionTracking hook) go through this index."""
        tracking.observe_global = self.observe

    def _args(self, session: str, fingerprints: np.ndarray, now: float) -> list[Any]:
        sid = hashlib.blake2b(session.encode(), digest_size=8).digest()
        args: list[Any] = [self.link.prefix, f"{now:20.6f}"[:20], repr(self.window_s), sid, self.max_entries,
                           self.bucket_size, max(1, math.ceil(self.window_s))]
        for row in np.atleast_2d(np.asarray(fingerprints, dtype=np.uint64))[: self.max_rows]:
            nz = np.sort(row[row != 0])
            if nz.size == 0:
                continue
            buckets = np.unique(nz[: self.n_index] % np.uint64(self.n_buckets))
            need = max(1, math.ceil(self.match_threshold * nz.size))
            args += [need, nz.astype("<u8").tobytes(), ",".join(str(int(b)) for b in buckets)]
        return args

    async def observe(self, session: str, fingerprints: np.ndarray, now: float) -> float:
        """Insert the request's fingerprints; the score of its row with most near-duplicates elsewhere."""
        local = float(self.local.observe(session, fingerprints, now))  # mirror: the fallback stays warm
        args = self._args(session, fingerprints, now)
        if len(args) == 7:
            return local
        result = await self.link.run("global", lambda c: self._observe_script(c)(args=args, client=c))
        if result is FALLBACK:
            return local
        remote = float(1.0 - 2.0 ** (-int(result) / self.m_half))  # type: ignore[call-overload]
        # Redis checks only the first rows of a batch; the local mirror saw every row: both are lower bounds
        return max(local, remote)

    def _observe_script(self, client: Any) -> Any:
        if self._script is None:
            self._script = client.register_script(_OBSERVE)
        return self._script
