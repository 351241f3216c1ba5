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
ARGV[7]  hold_ms     after a 429 cut, no other 429 cuts again for this long
ARGV[8]  backoff     after a 429 without headers, the limit goes this share below the
                     level the 429 came at (e.g. 0.1)
ARGV[9]  approach    windows it takes to climb back to that level; past them it probes
                     above it (e.g. 1)
ARGV[10] floor       the effective limit's floor, a share of the ceiling (e.g. 0.05)
ARGV[11] keep_ms     how long a learned limit stands without a new answer
ARGV[12] slack       share of the ceiling by which the upstream's remaining may fall short
                     of the gate's before it lowers the limit (the two count a call at
                     slightly different times)
ARGV[13] lag_ms      how much further back the gate's count reaches: half the tool's slot
                     margin, as acquire.lua checks admissions (the upstream counts a call
                     when it arrives, so it still holds calls just gone from the window)
ARGV[14] probe       the first probe above the level, a share of it (e.g. 0.05)
ARGV[15] growth      each window of probing without a 429 multiplies the step (e.g. 3)
ARGV[16] reset_ms    when the upstream says room comes back ('' when not reported)
ARGV[17] member      the call's member in KEYS[2] ('' when not known): without headers, an
                     answer that served it counts what the upstream served (`served`)
ARGV[18] reach_step  a 429 as a window turns over stretches the learned limit's windows
                     this much (ms; at most 2.5% of the longest window) ...
ARGV[19] reach_max   ... up to this (ms; at most 10% of it)

The effective limit is kept for the longest window; every other window of the target is
scaled by the same ratio. With headers: min(ceiling, limit, used + remaining), where used
is the target's use of its longest window now (the upstream counts calls the gate does not
see, or has a lower limit); after such a shortfall it is not raised again until the
upstream's reset (hysteresis). Without headers, 429s drive it, in the manner of TCP CUBIC:
a 429 marks the level the upstream refused at (`level`: the target's use of the window
then, as the gate counts it, or the effective limit if lower; never under `served`, what the
upstream served lately, counted at answered calls) and cuts the limit to (1 - backoff) x
level; later 429s within `hold_ms` only lower the level to the use then. A cut at a use
under `served` (a 429 as a window turns over: calls reach the upstream late) makes the
learned limit's windows reach `reach_step` further back (`reach`); a probe's cut takes a
quarter step back.
From there it climbs back to the level along a concave curve over `approach` windows
(slow near the level), then probes above it, each window's step `growth` times the last:
level x (1 + probe x (growth^n - 1) / (growth - 1)) after n whole windows of probing (held
through the window: a burst that comes late in it would otherwise meet a larger step). Under a
steady upstream that is one 429 per probe, every `approach` + 1 windows or so; when the
upstream's limit rises the probe finds it within a few windows. Back at the ceiling the
'adaptive:' field is deleted (the standing limits apply alone).

Returns {effective, ceiling, reason}: the longest window's maxes (decimal strings) and why
it last moved ('headers: limit 60', 'headers: remaining 12 < 30', '429', 'raised', or
'' when it never moved).
]]

local limits, log, costs = KEYS[1], KEYS[2], KEYS[3]
local target = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local busy = ARGV[4] == '1'
local reported_limit, remaining = tonumber(ARGV[5]), tonumber(ARGV[6])
local hold_ms, backoff, approach = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local floor_share, keep_ms = tonumber(ARGV[10]), tonumber(ARGV[11])
local slack_share, lag_ms = tonumber(ARGV[12]), tonumber(ARGV[13]) or 0
local probe, growth, reset_ms = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
local member = ARGV[17] or ''
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
local reach_step = math.min(tonumber(ARGV[18]) or 0, 0.025 * window)
local reach_max = math.min(tonumber(ARGV[19]) or 0, 0.1 * window)
-- Reach: how much longer than the target's windows the learned limit's are (ms).
local reach = math.max(0, math.min(reach_max, tonumber(state.reach) or 0))
local current = ceiling
if tonumber(state.effective) and tonumber(state.seen_ms) and now - state.seen_ms < keep_ms then
  current = math.min(ceiling, tonumber(state.effective))
end
local floor = math.max(1, floor_share * ceiling)

-- Units the target used in its longest window up to `at` (now), as the gate counted them;
-- `lag` reaches back further, to the calls the upstream (counting them on arrival) still
-- holds. (A wide weighted window is read from its log's sum: units.lua.)
local function used_now(lag, at)
  at = at or now
  if redis.call('HLEN', costs) == 0 then
    return redis.call('ZCOUNT', log, '(' .. fmt(at - window - lag), at)
  end
  return weighing().units_in(log, costs, at - window - lag, at, true, now, window + lag)
end

local effective, reason = current, state.reason or ''
if reported_limit or remaining then
  local goal, why = ceiling, 'raised'
  if reported_limit and reported_limit < goal then
    goal, why = reported_limit, 'headers: limit ' .. fmt(reported_limit)
  end
  local short = false
  if remaining then
    local used = used_now(lag_ms)
    local left = current - used
    if remaining < left - slack_share * ceiling and used + remaining < goal then
      goal, short = used + remaining, true
      why = 'headers: remaining ' .. fmt(remaining) .. ' < ' .. fmt(left)
    end
  end
  goal = math.max(goal, math.min(floor, reported_limit or floor))
  -- Hysteresis: after the upstream had less left than the gate counted, the limit is not
  -- raised again until the upstream said room would come back (its reset; a window when
  -- it names none), unless it reports a higher limit than it did then.
  local reported = reported_limit or ceiling
  if short then
    state.short_until = now + math.min(window, reset_ms or window)
    state.short_limit = reported
  end
  local held = now < (tonumber(state.short_until) or -math.huge)
               and reported <= (tonumber(state.short_limit) or math.huge)
  if goal < current then effective, reason = goal, why
  elseif goal > current and not held then effective, reason = goal, why end
  -- headers rule; 429s start afresh without them
  state.level, state.cut_ms, state.served, state.served_ms = nil, nil, nil, nil
  reach = 0
elseif busy then
  -- Never under what the upstream served lately (`served`): a 429 as a window turns over
  -- (a call of the last window arrived late and the upstream still counts it, while the
  -- gate's count has let it go) finds the gate's use low, though the upstream's limit held.
  local used, served = used_now(lag_ms + reach), tonumber(state.served) or 0
  local level = math.max(floor, used, served)
  if now - (tonumber(state.cut_ms) or -math.huge) >= hold_ms then
    level = math.min(current, level)
    effective, reason = math.max(floor, (1 - backoff) * level), '429'
    state.level, state.cut_ms = level, now
    -- Such a 429 says calls reach the upstream later than the gate's windows allow for:
    -- the learned limit's windows reach further back (its slots are let go later). A
    -- probe's 429 (at the use served) takes back a quarter step.
    if used < served then reach = math.min(reach_max, reach + reach_step)
    else reach = math.max(0, reach - reach_step / 4) end
  elseif level < (tonumber(state.level) or math.huge) then
    -- The same overshoot: no new cut, but its refused calls have left the log (cooldown),
    -- so the use now tells the level the upstream served at more closely.
    state.level = level
    local refined = math.max(floor, (1 - backoff) * level)
    if refined < current then effective, reason = refined, '429' end
  end
else
  -- Served: what the upstream served lately, as the gate counts it: the calls admitted
  -- in this call's window up to it, itself included (not those after it: they may still
  -- be on their way, to be refused), at most the level. The first answer after a cut
  -- starts it afresh (so a lower limit is learned a cut later); until then the last
  -- cycle's stands.
  local level, cut = tonumber(state.level), tonumber(state.cut_ms)
  local at = member ~= '' and tonumber(redis.call('ZSCORE', log, member))
  if level and cut and at then
    local served = math.min(level, used_now(lag_ms + reach, at))
    if (tonumber(state.served_ms) or -math.huge) > cut then
      served = math.max(served, tonumber(state.served) or 0)
    end
    state.served, state.served_ms = served, now
  end
end
if not (reported_limit or remaining or busy) and current < ceiling then
  local level, cut = tonumber(state.level), tonumber(state.cut_ms)
  if not (level and cut) then  -- lowered by headers that stopped: probe from here
    level, cut = current, now - approach * window
    state.level, state.cut_ms = level, cut
  end
  local t = (now - cut) / window
  local curve
  if t < approach then curve = level * (1 - backoff * (1 - t / approach) ^ 3)
  else  -- a step holds for its whole window: calls that come late in it get no larger one
    local n = math.min(math.floor(t - approach + 1e-9), 60)
    curve = level * (1 + probe * (growth ^ n - 1) / (growth - 1))
  end
  effective = math.min(ceiling, math.max(current, curve))
  if effective > current then reason = 'raised' end
end

if effective ~= current then state.changed_ms = now end
state.effective, state.ceiling, state.reason = effective, ceiling, reason
reach = math.floor(reach + 0.5)  -- whole ms: acquire.lua takes windows as integers
state.reach = reach > 0 and reach or nil
state.at_ms, state.seen_ms = now, now
redis.call('HSET', limits, state_field, cjson.encode(state))
if effective >= ceiling then
  redis.call('HDEL', limits, field)
else
  local parts = {fmt(now + keep_ms)}
  for i = 1, #maxes do
    parts[#parts + 1] = fmt(maxes[i] * effective / ceiling) .. ' ' .. fmt(windows[i] + reach)
  end
  redis.call('HSET', limits, field, table.concat(parts, ' '))
end
return {fmt(effective), fmt(ceiling), reason}
