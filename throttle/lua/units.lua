--[[ units (put before acquire, release, cooldown, settle and adapt): what a log's entries
weigh.

A log ZSET counts each entry as 1 unit unless its cost HASH gives the member other units.
A cost hash that gives any also keeps, under the field '' (no call id is empty), the sum of
the units of every entry of its log: acquire.lua then reads a wide window's use from the
few entries outside it instead of walking thousands inside. Only acquire.lua creates the
sum (and rebuilds it where a hash has none, as one written before it existed); every script
that adds or takes out an entry of a summed log changes the sum with it, here. adapt.lua
reads it as acquire.lua does.
]]
local TOTAL = ''

-- Exact (17 significant digits): bounds built from slots must match the stored scores.
-- (A number passed to redis.call is sent exactly too, and costs less: only text bounds,
-- exclusive ones and replies, need fmt.)
local function fmt(x) return string.format('%.17g', x) end

-- Weighted windows are walked entry by entry: the units of many members are read (and
-- dropped) a chunk per call, not one call each (a call costs the server ~1 µs here).
local CHUNK = 500
-- The units of `list`'s members (every `step`-th item from 1: a WITHSCORES reply has step
-- 2) in `hash`, 1 for a member without an entry, as a table by the item's index.
local function units_of(hash, list, step)
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

-- The units of `list`'s members (every `step`-th item from 1), added up in order.
local function sum_of(hash, list, step)
  local units, sum = units_of(hash, list, step), 0
  for i = 1, #list, step do sum = sum + units[i] end
  return sum
end

-- Windows wider than FEW entries read their use from the log's sum less the entries outside
-- them, when those are fewer. Exact while the numbers are whole (a fractional sum may carry
-- a rounding: its windows are walked).
local FEW = 32

-- The units of the entries of `zset` in (floor, upto] (upto nil: no upper bound); `whole`:
-- the decision's own numbers are whole, so the log's sum may stand in for the walk.
local function units_in(zset, hash, floor, upto, whole)
  local lo, hi = '(' .. fmt(floor), upto and fmt(upto) or '+inf'
  if whole then
    local inside = redis.call('ZCOUNT', zset, lo, hi)
    local total = inside > FEW and redis.call('ZCARD', zset) - inside < inside
                  and tonumber(redis.call('HGET', hash, TOTAL))
    if total then
      local used = total - sum_of(hash, redis.call('ZRANGEBYSCORE', zset, '-inf', fmt(floor)), 1)
      if upto then
        used = used - sum_of(hash, redis.call('ZRANGEBYSCORE', zset, '(' .. hi, '+inf'), 1)
      end
      if used % 1 == 0 then return used end
    end
  end
  return sum_of(hash, redis.call('ZRANGEBYSCORE', zset, lo, hi), 1)
end

-- Add `m` at `score` with `units`, or move it when it is there (a cost of 1 then leaves
-- its units as they were). `summed`: whether `hash` keeps the sum, which the first
-- weighted entry starts (acquire.lua only: every other entry then weighs 1). Returns
-- whether the hash keeps the sum now.
local function log_put(zset, hash, summed, score, m, units)
  local added = redis.call('ZADD', zset, score, m) == 1
  if units == 1 then
    if added and summed then redis.call('HINCRBYFLOAT', hash, TOTAL, 1) end
    return summed
  end
  local old = 0
  if not added then old = tonumber(redis.call('HGET', hash, m)) or 1 end
  redis.call('HSET', hash, m, units)
  if summed then
    if units ~= old then redis.call('HINCRBYFLOAT', hash, TOTAL, units - old) end
  else
    redis.call('HSET', hash, TOTAL, redis.call('ZCARD', zset) - 1 + units)
  end
  return true
end

-- Take `m` out of `zset` and its units out of `hash` (and out of the sum, when `summed`).
local function log_drop(zset, hash, summed, m)
  local removed = redis.call('ZREM', zset, m) == 1
  local units = summed and removed and redis.call('HGET', hash, m)
  redis.call('HDEL', hash, m)
  if summed and removed then
    redis.call('HINCRBYFLOAT', hash, TOTAL, -(tonumber(units) or 1))
  end
end

