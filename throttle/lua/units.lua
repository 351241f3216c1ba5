--[[ units (put before acquire, release, cooldown, settle and adapt): what a log's entries
weigh.

A log ZSET counts each entry as 1 unit unless its cost HASH gives the member other units.
Once a window of a weighted log holds more than FEW entries, the hash also keeps, under the
field '' (no call id is empty), '<units> <entries> <built at ms>': the sum of the units of
every entry of its log, how many entries that is, and when it was last built by a walk of
the log. A wide window's use is then read from the few entries outside it instead of
walking thousands inside. Every script that adds or takes out an entry of a log whose hash
keeps a sum changes it with it, here; acquire.lua drops it when no entry is weighted any
more. A reader builds it again when its count is not the log's (a writer that does not
keep it, as a worker of an older version during an upgrade) and once a window has passed
since it was built (so no drift outlives a window). acquire.lua and adapt.lua read it.
]]
local TOTAL, CHUNK, FEW = '', 500, 32

-- Exact (17 significant digits): bounds built from slots must match the stored scores.
-- (A number passed to redis.call is sent exactly too, and costs less: only text bounds,
-- exclusive ones and replies, need fmt. Redis formats it with '%.17g', ~3k instructions, a
-- third of a cheap call into Redis: constants go as text, whole numbers as '%d'.) Times are
-- whole milliseconds (the server clock is read in them), and '%d' costs half of '%.17g'.
local function fmt(x)
  if x % 1 == 0 and x < 9007199254740992 and x > -9007199254740992 then
    return string.format('%d', x)
  end
  return string.format('%.17g', x)
end

-- The sum each cost hash keeps, {units, entries, built at}, or false (read once per script;
-- acquire.lua sets what its trim learned).
local sums = {}

-- The functions of weighted logs, built on first use: a closure costs the server ~0.3 µs,
-- and a call on a log without weights needs none of them.
local W
local function weighing()
  if W then return W end
  W = {}
  -- The units of `list`'s members (every `step`-th item from 1: a WITHSCORES reply has step
  -- 2) in `hash`, 1 for a member without an entry, as a table by the item's index; read a
  -- chunk per call, not one call each (a call costs the server ~1 µs).
  function W.units_of(hash, list, step)
    local units = {}
    for first = 1, #list, CHUNK * step do
      local fields = {}
      for i = first, math.min(#list, first + CHUNK * step - 1), step do
        fields[#fields + 1] = list[i]
      end
      local got = redis.call('HMGET', hash, unpack(fields))
      for k = 1, #fields do units[first + (k - 1) * step] = tonumber(got[k]) or 1 end
    end
    return units
  end

  -- The same, added up in order.
  function W.sum_of(hash, list, step)
    local units, sum = W.units_of(hash, list, step), 0
    for i = 1, #list, step do sum = sum + units[i] end
    return sum
  end

  -- The sum `hash` keeps, or false.
  function W.kept(hash)
    local sum = sums[hash]
    if sum == nil then
      local text = redis.call('HGET', hash, TOTAL)
      local units, entries, built = string.match(text or '', '^(%S+) (%S+) (%S+)$')
      sum = units and {tonumber(units), tonumber(entries), tonumber(built)} or false
      sums[hash] = sum
    end
    return sum
  end

  function W.set(hash, sum)
    sums[hash] = sum
    redis.call('HSET', hash, TOTAL, fmt(sum[1]) .. ' ' .. sum[2] .. ' ' .. fmt(sum[3]))
  end

  -- Change the sum `hash` keeps (if any) by `units` over `entries` entries.
  function W.add(hash, units, entries)
    local sum = W.kept(hash)
    if sum then W.set(hash, {sum[1] + units, sum[2] + entries, sum[3]}) end
  end

  -- The units of the entries of `zset` in (floor, upto] (upto nil: no upper bound), at `now`
  -- for a window of `width` ms. Windows wider than FEW entries read their use from the log's
  -- sum less the entries outside them, when those are fewer. `whole`: the decision's own
  -- numbers are whole; the sum then stands in for the walk when the result is whole too (a
  -- fractional sum may carry a rounding: its windows are walked).
  function W.units_in(zset, hash, floor, upto, whole, now, width)
    local lo, hi = '(' .. fmt(floor), upto and fmt(upto) or '+inf'
    local inside = whole and redis.call('ZCOUNT', zset, lo, hi)
    local entries = inside and inside > FEW and redis.call('ZCARD', zset)
    if entries and entries - inside < inside then
      local sum = W.kept(hash)
      if not sum or sum[2] ~= entries or now - sum[3] > width then
        sum = {W.sum_of(hash, redis.call('ZRANGE', zset, '0', '-1'), 1), entries, now}
        W.set(hash, sum)
      end
      local used = sum[1] - W.sum_of(hash, redis.call('ZRANGEBYSCORE', zset, '-inf',
                                                       fmt(floor)), 1)
      if upto then
        used = used - W.sum_of(hash, redis.call('ZRANGEBYSCORE', zset, '(' .. hi, '+inf'), 1)
      end
      if used % 1 == 0 then return used end
    end
    return W.sum_of(hash, redis.call('ZRANGEBYSCORE', zset, lo, hi), 1)
  end
  return W
end

-- Add `m` at `score` (ms, or fmt's text of it) with `units`, or move it when it is there
-- (a cost of 1 then leaves its units as they were).
local function log_put(zset, hash, score, m, units)
  local added = redis.call('ZADD', zset, type(score) == 'string' and score or fmt(score), m) == 1
  if units == 1 then
    if added and sums[hash] ~= false then weighing().add(hash, 1, 1) end
    return
  end
  local w = weighing()
  local old = not added and w.kept(hash) and (tonumber(redis.call('HGET', hash, m)) or 1)
  redis.call('HSET', hash, m, units)
  if added then
    w.add(hash, units, 1)
  elseif old and units ~= old then
    w.add(hash, units - old, 0)
  end
end

-- Take `m` out of `zset` and its units out of `hash` (and out of the sum).
local function log_drop(zset, hash, m)
  local removed = redis.call('ZREM', zset, m) == 1
  local w = removed and sums[hash] ~= false and weighing()
  local units = w and w.kept(hash) and (tonumber(redis.call('HGET', hash, m)) or 1)
  redis.call('HDEL', hash, m)
  if units then w.add(hash, -units, -1) end
end

