--[[ acquire: admit a call now, reserve its earliest slot, or refuse it (fallback).

KEYS[1]  log   ZSET  member = task id, score = admission time or reserved slot (ms)
KEYS[2]  rsv   ZSET  members whose entry is a reservation not yet admitted, score = slot (ms)
KEYS[3]  cost  HASH  member -> units, only for members whose cost is not 1
  (all three share one hash tag: one tool, or one tool and key value)

ARGV[1]  member       the task id (a redelivered task is never counted twice)
ARGV[2]  cost         units this call uses (> 0)
ARGV[3]  deadline_ms  the longest wait allowed; a later slot means fallback
ARGV[4]  gap_ms       0 for earliest-slot pacing, else the spacing of delayed calls
ARGV[5]  margin_ms    slot margin: admissions are checked against window + margin/2, so
                      a body starting up to margin/2 after its admission still keeps the
                      limit; reservations are placed window + margin apart, so a call that
                      comes back up to margin/2 late does not hold up the calls behind it
ARGV[6]  now_ms       '' to use the server clock (TIME); a pinned time in tests only
ARGV[7]  n            number of limits, then n pairs:
ARGV[6+2i], ARGV[7+2i]  max units, window ms

Returns {action, wait_ms, slot_ms, reason}: action is 'admit', 'delay' or 'fallback';
wait_ms and slot_ms are decimal strings (slot_ms is the admission time or reserved slot).

Windows are half-open: an entry at score s counts in (t - window, t]. Admissions check the
trailing window of everything at or before now, so admitted units never exceed max in any
window even when reserved calls come back late; new arrivals are placed at the earliest slot
not before the latest one already taken (FIFO) that breaks no window.
]]

local log, rsv, costs = KEYS[1], KEYS[2], KEYS[3]
local member = ARGV[1]
local cost = tonumber(ARGV[2])
local deadline = tonumber(ARGV[3])
local gap = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
end
local n = tonumber(ARGV[7])
local maxes, windows, longest = {}, {}, 0
for i = 1, n do
  maxes[i] = tonumber(ARGV[6 + 2 * i])
  windows[i] = tonumber(ARGV[7 + 2 * i])
  if windows[i] > longest then longest = windows[i] end
end

local LATE_GRACE_MS = 1000
local function fmt(x) return string.format('%.3f', x) end

-- Trim what no window can see any more; unused reservations expire with it.
local weighted = redis.call('HLEN', costs) > 0
for i = 1, n do windows[i] = windows[i] + margin / 2 end
longest = longest + margin
local cutoff = now - longest
if weighted then
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  for _, m in ipairs(old) do redis.call('HDEL', costs, m) end
end
redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', rsv, '-inf', cutoff)

local function unit_of(m)
  if not weighted then return 1 end
  return tonumber(redis.call('HGET', costs, m) or '1')
end

-- Earliest t >= `from` at which the entries in (t - window, upto] (all <= t), without
-- `skip`, leave room for `cost` under `max`. Returns nil when cost alone exceeds max.
local function earliest(from, upto, max, window, skip)
  if cost > max then return nil end
  local floor = fmt(from - window)
  local lo = '(' .. floor
  local hi = upto and fmt(upto) or '+inf'
  if not weighted then
    -- Unit costs: count, then fetch only the entries that must leave the window.
    local used = redis.call('ZCOUNT', log, lo, hi)
    local skip_rank = nil
    if skip then
      local s = tonumber(redis.call('ZSCORE', log, skip))
      if s > tonumber(floor) and (not upto or s <= upto) then
        used = used - 1
        skip_rank = redis.call('ZRANK', log, skip) - redis.call('ZCOUNT', log, '-inf', floor)
      end
    end
    local excess = used + cost - max
    if excess <= 0 then return from end
    local offset = excess - 1
    if skip_rank and skip_rank <= offset then offset = offset + 1 end
    local entry = redis.call('ZRANGEBYSCORE', log, lo, hi, 'WITHSCORES', 'LIMIT', offset, 2)
    if entry[1] == skip then return tonumber(entry[4]) + window end
    return tonumber(entry[2]) + window
  end
  local entries = redis.call('ZRANGEBYSCORE', log, lo, hi, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do
    if entries[i] ~= skip then used = used + unit_of(entries[i]) end
  end
  local excess = used + cost - max
  if excess <= 0 then return from end
  local freed = 0
  for i = 1, #entries, 2 do
    if entries[i] ~= skip then
      freed = freed + unit_of(entries[i])
      if freed >= excess then return tonumber(entries[i + 1]) + window end
    end
  end
  return nil
end

-- Keys live until the latest entry (admission or reservation) has left every window.
local function expire(last)
  local tail = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')[2]
  if tail and tonumber(tail) > last then last = tonumber(tail) end
  local ttl = math.ceil(last - now + longest) + 1000
  redis.call('PEXPIRE', log, ttl)
  redis.call('PEXPIRE', rsv, ttl)
  if weighted or cost ~= 1 then redis.call('PEXPIRE', costs, ttl) end
end

local held = redis.call('ZSCORE', log, member)
if held then
  local slot = redis.call('ZSCORE', rsv, member)
  if not slot then
    return {'admit', '0', held, 'readmitted'}
  end
  slot = tonumber(slot)
  if slot > now then
    return {'delay', fmt(slot - now), fmt(slot), 'early'}
  end
  -- A reservation is due: it is admitted only if the trailing windows hold it now.
  local t = now
  for i = 1, n do
    local at = earliest(now, now, maxes[i], windows[i], member)
    if at == nil then return {'fallback', '0', fmt(now), 'cost_exceeds_limit'} end
    if at > t then t = at end
  end
  -- A reservation was promised within the deadline; lateness that is not the caller's
  -- gets a grace of LATE_GRACE_MS before the call falls back.
  if t - now > deadline + LATE_GRACE_MS then
    redis.call('ZREM', log, member)
    redis.call('ZREM', rsv, member)
    redis.call('HDEL', costs, member)
    return {'fallback', '0', fmt(t), 'deadline'}
  end
  if t > now then
    -- Held up by calls admitted late: the reservation keeps its place (and counts for
    -- the due calls behind it, which keeps them in order) until the window frees.
    return {'delay', fmt(t - now), fmt(t), 'late'}
  end
  redis.call('ZADD', log, now, member)
  redis.call('ZREM', rsv, member)
  expire(now)
  return {'admit', '0', fmt(now), 'reservation'}
end

-- A new call: admitted now if nothing is reserved ahead and every window holds it;
-- else the earliest slot, not before the latest one already taken (FIFO).
local latest = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')
local start = now
if latest[2] and tonumber(latest[2]) > start then start = tonumber(latest[2]) end
local t = start
for i = 1, n do
  local at = earliest(start, nil, maxes[i], windows[i], nil)
  if at == nil then return {'fallback', '0', fmt(now), 'cost_exceeds_limit'} end
  if at > t then t = at end
end
if t > now and margin > 0 then
  t = start
  for i = 1, n do
    local at = earliest(start, nil, maxes[i], windows[i] + margin / 2, nil)
    if at > t then t = at end
  end
end
if t > now and gap > 0 and latest[2] then
  local paced = tonumber(latest[2]) + gap
  if paced > t then t = paced end
end

if t <= now then
  redis.call('ZADD', log, now, member)
  if cost ~= 1 then redis.call('HSET', costs, member, cost) end
  expire(now)
  return {'admit', '0', fmt(now), 'admitted'}
end
if t - now > deadline then
  return {'fallback', '0', fmt(t), 'deadline'}
end
redis.call('ZADD', log, t, member)
redis.call('ZADD', rsv, t, member)
if cost ~= 1 then redis.call('HSET', costs, member, cost) end
expire(t)
return {'delay', fmt(t - now), fmt(t), 'reserved'}
