--[[ units (put before acquire, release, cooldown, settle and adapt): what a log's entries
weigh.

A log ZSET counts each entry as 1 unit unless its cost HASH gives the member other units.
Once a window of a weighted log holds more than FEW entries, the hash also keeps, under the
field '' (no call id is empty), the sum of the units of every entry of its log: a wide
window's use is then read from the few entries outside it instead of walking thousands
inside. The first reader that needs the sum builds it (one walk of the log); every script
that adds or takes out an entry of a log whose hash keeps one changes it with it, here; and
acquire.lua drops it when no entry is weighted any more. acquire.lua and adapt.lua read it.
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

-- Whether `hash` keeps its log's sum (read once per script; acquire.lua sets what it knows).
local sums = {}
local function summed(hash)
  if sums[hash] == nil then sums[hash] = redis.call('HGET', hash, TOTAL) ~= false end
  return sums[hash]
end

-- Windows wider than FEW entries read their use from the log's sum less the entries outside
-- them, when those are fewer. Exact while the numbers are whole (a fractional sum may carry
-- a rounding: its windows are walked).
local FEW = 32

-- The units of the entries of `zset` in (floor, upto] (upto nil: no upper bound); `whole`:
-- the decision's own numbers are whole, so the log's sum may stand in for the walk.
local function units_in(zset, hash, floor, upto, whole)
  local lo, hi = '(' .. fmt(floor), upto and fmt(upto) or '+inf'
  local inside = whole and redis.call('ZCOUNT', zset, lo, hi)
  if inside and inside > FEW and redis.call('ZCARD', zset) - inside < inside then
    local used = tonumber(redis.call('HGET', hash, TOTAL))
    if not used then  -- the first wide window: the sum starts from one walk of the log
      used = sum_of(hash, redis.call('ZRANGE', zset, 0, -1), 1)
      redis.call('HSET', hash, TOTAL, used)
      sums[hash] = true
    end
    used = used - sum_of(hash, redis.call('ZRANGEBYSCORE', zset, '-inf', fmt(floor)), 1)
    if upto then
      used = used - sum_of(hash, redis.call('ZRANGEBYSCORE', zset, '(' .. hi, '+inf'), 1)
    end
    if used % 1 == 0 then return used end
  end
  return sum_of(hash, redis.call('ZRANGEBYSCORE', zset, lo, hi), 1)
end

-- Add `m` at `score` with `units`, or move it when it is there (a cost of 1 then leaves
-- its units as they were).
local function log_put(zset, hash, score, m, units)
  local added = redis.call('ZADD', zset, score, m) == 1
  if units == 1 then
    if added and summed(hash) then redis.call('HINCRBYFLOAT', hash, TOTAL, 1) end
    return
  end
  local old = summed(hash) and (added and 0 or (tonumber(redis.call('HGET', hash, m)) or 1))
  redis.call('HSET', hash, m, units)
  if old and units ~= old then redis.call('HINCRBYFLOAT', hash, TOTAL, units - old) end
end

-- Take `m` out of `zset` and its units out of `hash` (and out of the sum).
local function log_drop(zset, hash, m)
  local removed = redis.call('ZREM', zset, m) == 1
  local units = removed and summed(hash) and redis.call('HGET', hash, m)
  redis.call('HDEL', hash, m)
  if removed and summed(hash) then
    redis.call('HINCRBYFLOAT', hash, TOTAL, -(tonumber(units) or 1))
  end
end

