"""The session store's Lua scripts: each merges one request's changes into a session hash atomically.

They touch the keys of one session only (both are declared in ``KEYS``), so they run on standalone Redis and
Sentinel; the field layout is described in ``guard_agent.sessions.redis.store``.
"""

from __future__ import annotations

__all__ = ["CHAINS", "DELETE", "GET", "PUT", "UNBLOCK"]

CHAINS = 16  # write chains remembered per session hash (a resend older than this is applied again)

# The session hash without its write-chain ring (``c``: the script's bookkeeping, not the replicas' business).
_FIELDS = """
local function fields(k)
  local h = redis.call('HGETALL', k)
  for i = 1, #h, 2 do
    if h[i] == 'c' then table.remove(h, i + 1); table.remove(h, i); break end
  end
  return h
end
"""

# KEYS[1] session hash, KEYS[2] its deletion tombstone.
# ARGV: 1 ttl_ms, 2 now, 3 first_seen, 4 query delta, 5 base version,
# 6 bucket? (0/1), 7 tokens, 8 updated, 9 base tokens ('' = none), 10 block until ('' = unchanged), 11 rule,
# 12 tracker? (0/1), 13 tracker bytes ('' = none), 14 tracker time, 15 scores JSON, 16 return the hash? (0/1),
# 17 absolute queries (written instead of the delta when a key synced before is gone: Redis lost it),
# 18 write chain: the id of the base the deltas are counted from (see ``records.Base.chain``),
# 19 the block (ARGV 10/11) was set since the base (1) or only offered again by a merge (0: written only when
# Redis lost the key; an operator unblock or reset since the base must not be undone by it).
#
# Deltas are cumulative per chain and the hash remembers, in field ``c``, what the last CHAINS chains have
# applied ("id queries spend;" each): a write that is sent again (redis-py's retry on a dropped connection, a
# reconcile after a put that timed out but ran) adds only what it adds beyond its chain's earlier writes; one
# that counts fewer queries than the chain's was sent before it (the two reached Redis in the reverse order)
# and its bucket is stale: left out.
PUT = _FIELDS + """
local k = KEYS[1]
local lost = redis.call('EXISTS', k) == 0 and tonumber(ARGV[5]) > 0 and redis.call('EXISTS', KEYS[2]) == 0
local v = tonumber(redis.call('HGET', k, 'v') or '0')
local same = tonumber(ARGV[5]) == v
local chain, pq, ps = ARGV[18], 0, 0
local ring = {}
for id, q, s in string.gmatch(redis.call('HGET', k, 'c') or '', '(%S+) (%S+) (%S+);') do
  if id == chain then pq, ps = tonumber(q), tonumber(s) else ring[#ring + 1] = id .. ' ' .. q .. ' ' .. s .. ';' end
end
local f = tonumber(redis.call('HGET', k, 'f'))
if f == nil or tonumber(ARGV[3]) < f then redis.call('HSET', k, 'f', ARGV[3]) end
local l = tonumber(redis.call('HGET', k, 'l'))
if l == nil or tonumber(ARGV[2]) > l then redis.call('HSET', k, 'l', ARGV[2]) end
local dq = tonumber(ARGV[4])
if lost then redis.call('HSET', k, 'q', ARGV[17])
elseif dq > pq then redis.call('HINCRBY', k, 'q', dq - pq) end
local older = dq < pq  -- sent before a write of this chain that ran already and carries its spend too
if older then dq = pq end
local spend = ps
if ARGV[6] == '1' and not older then
  local st = tonumber(redis.call('HGET', k, 'bt'))
  local su = tonumber(redis.call('HGET', k, 'bu'))
  local lt = tonumber(ARGV[7])
  local base = tonumber(ARGV[9])
  if base ~= nil then spend = base - lt end
  if same or st == nil or su == nil then
    redis.call('HSET', k, 'bt', ARGV[7], 'bu', ARGV[8])
  else
    local merged
    if base == nil then merged = math.min(st, lt) else merged = math.min(st - (spend - ps), math.max(st, lt)) end
    if merged < 0 then merged = 0 end
    redis.call('HSET', k, 'bt', tostring(merged), 'bu', tostring(math.max(su, tonumber(ARGV[8]))))
  end
end
if lost then ring = {} end
ring[#ring + 1] = chain .. ' ' .. tostring(dq) .. ' ' .. string.format('%.9g', spend) .. ';'
local first = math.max(1, #ring - CHAINS + 1)
redis.call('HSET', k, 'c', table.concat(ring, '', first, #ring))
if ARGV[10] ~= '' and (ARGV[19] == '1' or lost) then
  local ku = tonumber(redis.call('HGET', k, 'ku'))
  if ku == nil or tonumber(ARGV[10]) >= ku then redis.call('HSET', k, 'ku', ARGV[10], 'kr', ARGV[11]) end
end
if ARGV[12] == '1' then
  local tl = tonumber(redis.call('HGET', k, 'tl'))
  if tl == nil or tonumber(ARGV[14]) >= tl then
    if ARGV[13] == '' then redis.call('HDEL', k, 't') else redis.call('HSET', k, 't', ARGV[13]) end
    redis.call('HSET', k, 'tl', ARGV[14], 's', ARGV[15])
  end
end
local nv = redis.call('HINCRBY', k, 'v', 1)
redis.call('PEXPIRE', k, ARGV[1])
if ARGV[16] == '1' then return fields(k) end
return nv
""".replace("CHAINS", str(CHAINS))

# KEYS[1] session hash, KEYS[2] its tombstone: the hash, or a lone field ``x`` when an operator deleted it.
GET = _FIELDS + """
local h = fields(KEYS[1])
if #h == 0 and redis.call('EXISTS', KEYS[2]) == 1 then return {'x', '1'} end
return h
"""

# KEYS[1] session hash, KEYS[2] tombstone; ARGV[1] tombstone TTL (ms).
DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return n
"""

UNBLOCK = """
if redis.call('HEXISTS', KEYS[1], 'kr') == 1 then
  redis.call('HDEL', KEYS[1], 'kr', 'ku')
  redis.call('HINCRBY', KEYS[1], 'v', 1)
  return 1
end
return 0
"""

