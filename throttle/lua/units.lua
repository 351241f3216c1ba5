--[[ units (put before acquire, release, cooldown and settle): what a log's entries weigh.

A log ZSET counts each entry as 1 unit unless its cost HASH gives the member other units.
A cost hash that gives any also keeps, under the field '' (no call id is empty), the sum of
the units of every entry of its log: acquire.lua then reads a wide window's use from the
few entries outside it instead of walking thousands inside. Only acquire.lua creates the
sum (and rebuilds it where a hash has none, as one written before it existed); every script
that adds or takes out an entry of a summed log changes the sum with it, here.
]]
local TOTAL = ''

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

