--[[ adapt: move a pool's (or tool's) effective limit after one upstream answer.

KEYS[1]  limits  HASH  the live limits acquire.lua reads (throttle/keys.py); this script
                       writes two fields of it, never the operator's own:
                       'adaptive:<target>'       "until_ms max window_ms ..." read by
                                                  acquire.lua beside the standing limits
                       'adaptive-state:<target>' JSON for status: configured and effective
                                                  max of the longest window, why and when
KEYS[2]  log     ZSET  the target's log (the pool's, or the tool's): its use now
KEYS[3]  cost    HASH  member -> units for that log

ARGV[1]  target      'pool' or 'tool:<name>' (also the field of an operator's override)
ARGV[2]  now_ms      '' to use the server clock (TIME); a pinned time in tests only
ARGV[3]  configured  the file's limits, "max window_ms ..."; an override in KEYS[1] at
                     ARGV[1] stands instead: the effective limit never goes above it
ARGV[4]  busy        '1' when the upstream refused the call (429), else '0'
ARGV[5]  limit       the upstream's limit for the target's unit ('' when not reported)
ARGV[6]  remaining   what the upstream says remains of it ('' when not reported)
ARGV[7]  hold_ms     after a 429 decrease, no other 429 lowers it again for this long
ARGV[8]  decrease    the multiplicative decrease on a 429 without headers (e.g. 0.7)
ARGV[9]  increase    share of the ceiling added back per window of answers without
                     headers and without 429 (e.g. 0.1)
ARGV[10] floor       the effective limit's floor, a share of the ceiling (e.g. 0.05)
ARGV[11] keep_ms     how long a learned limit stands without a new answer
ARGV[12] slack       share of the ceiling by which the upstream's remaining may fall short
                     of the gate's before it lowers the limit (the two count a call at
                     slightly different times)

The effective limit is kept for the longest window; every other window of the target is
scaled by the same ratio. With headers: min(ceiling, limit, used + remaining), where used
is the target's use of its longest window now (the upstream counts calls the gate does not
see, or has a lower limit). Without: a 429 multiplies it by `decrease`, answers raise it by
`increase` x ceiling per window elapsed. Back at the ceiling the 'adaptive:' field is
deleted (the standing limits apply alone).

Returns {effective, ceiling, reason}: the longest window's maxes (decimal strings) and why
it last moved ('headers: limit 60', 'headers: remaining 12 < 30', '429', 'raised', or
'' when it never moved).
]]

local limits, log, costs = KEYS[1], KEYS[2], KEYS[3]
local target = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
end
local busy = ARGV[4] == '1'
local reported_limit, remaining = tonumber(ARGV[5]), tonumber(ARGV[6])
local hold_ms, decrease, increase = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local floor_share, keep_ms = tonumber(ARGV[10]), tonumber(ARGV[11])
local slack_share = tonumber(ARGV[12])
local field, state_field = 'adaptive:' .. target, 'adaptive-state:' .. target

local function pairs_of(text)
  local ms, ws = {}, {}
  for m, w in string.gmatch(text or '', '(%S+) (%S+)') do
    local max, window = tonumber(m), tonumber(w)
    if not (max and window and max > 0 and window > 0 and max < math.huge
            and window < math.huge) then return nil end
    ms[#ms + 1], ws[#ws + 1] = max, window
  end
  if #ms == 0 then return nil end
  return ms, ws
end
local maxes, windows = pairs_of(redis.call('HGET', limits, target))
if not maxes then maxes, windows = pairs_of(ARGV[3]) end
local longest = 1
for i = 2, #windows do if windows[i] > windows[longest] then longest = i end end
local ceiling, window = maxes[longest], windows[longest]

local state = {}
local raw = redis.call('HGET', limits, state_field)
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then state = decoded end
end
local current = ceiling
if tonumber(state.effective) and tonumber(state.seen_ms) and now - state.seen_ms < keep_ms then
  current = math.min(ceiling, tonumber(state.effective))
end
local floor = math.max(1, floor_share * ceiling)
local function fmt(x) return string.format('%.17g', x) end

-- Units the target used in its longest window, as the gate counted them.
local function used_now()
  local entries = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(now - window), fmt(now))
  if redis.call('HLEN', costs) == 0 then return #entries end
  local sum, batch = 0, 500
  for from = 1, #entries, batch do
    local last = math.min(#entries, from + batch - 1)
    local units = redis.call('HMGET', costs, unpack(entries, from, last))
    for i = 1, #units do sum = sum + (tonumber(units[i]) or 1) end
  end
  return sum
end

local effective, reason = current, state.reason or ''
if reported_limit or remaining then
  local goal, why = ceiling, 'raised'
  if reported_limit and reported_limit < goal then
    goal, why = reported_limit, 'headers: limit ' .. fmt(reported_limit)
  end
  if remaining then
    local used = used_now()
    local left = current - used
    if remaining < left - slack_share * ceiling and used + remaining < goal then
      goal = used + remaining
      why = 'headers: remaining ' .. fmt(remaining) .. ' < ' .. fmt(left)
    end
  end
  goal = math.max(goal, math.min(floor, reported_limit or floor))
  if goal < current then effective, reason = goal, why
  elseif goal > current then effective, reason = goal, 'raised' end
elseif busy then
  if now - (tonumber(state.cut_ms) or -math.huge) >= hold_ms then
    effective, reason = math.max(floor, current * decrease), '429'
    state.cut_ms = now
  end
elseif current < ceiling then
  local since = tonumber(state.at_ms) or now
  effective = math.min(ceiling, current + increase * ceiling * (now - since) / window)
  if effective > current then reason = 'raised' end
end

if effective ~= current then state.changed_ms = now end
state.effective, state.ceiling, state.reason = effective, ceiling, reason
state.at_ms, state.seen_ms = now, now
redis.call('HSET', limits, state_field, cjson.encode(state))
if effective >= ceiling then
  redis.call('HDEL', limits, field)
else
  local parts = {fmt(now + keep_ms)}
  for i = 1, #maxes do
    parts[#parts + 1] = fmt(maxes[i] * effective / ceiling) .. ' ' .. fmt(windows[i])
  end
  redis.call('HSET', limits, field, table.concat(parts, ' '))
end
return {fmt(effective), fmt(ceiling), reason}
