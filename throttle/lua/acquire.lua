--[[ acquire: admit a call now, reserve its earliest slot, or refuse it (fallback).

KEYS[1]  log        ZSET  member = task id, score = admission time or reserved slot (ms)
KEYS[2]  adm        ZSET  (while the log may hold reservations) every admission in the
                      log, score = its log score, and the member '' at +inf: a log entry
                      not in it is a reservation not yet admitted, so a held call is
                      stored once, in the log. The first reservation made while adm does
                      not exist makes it; it shares the log's TTL. Without it, every
                      entry of the log is an admission
KEYS[3]  cost       HASH  member -> units, only for members whose cost is not 1 (and, once
                      a window of the log is wide, the sum of its units: units.lua)
KEYS[4]  pool log   ZSET  (tools in a pool) admissions of every tool of the pool, score = ms
KEYS[5]  pool cost  HASH  (tools in a pool) member -> units, for members whose cost is not 1
                      (and the same sum)
KEYS[4 or 6] leases ZSET  (tools with a concurrency cap) running calls, score = lease end (ms)
KEYS[next] cooldown  STRING until when (ms) the upstream asked for no calls (the pool's, or
                      the tool's); set by cooldown.lua
KEYS[next] free      ZSET  slots given back by released reservations (release.lua), member =
                      '<units>:<task id>', score = slot (ms); the next new calls take them
KEYS[next] calls     ZSET  (optional) the tool's undecided calls, by when to count them lost
KEYS[next] calls msg HASH  (optional) their messages; both lose the member once it is
                      admitted or refused (throttle/recovery.py)
KEYS[next] decided   ZSET  (optional, after the two above) calls decided before their
                      registration arrived, score = until when (ms) register.lua drops it
KEYS[next] limits    HASH (when ARGV carries the fields below) live limits that replace the
                      ones passed in ARGV: see "Live limits" below and throttle/overrides.py
KEYS[next] quota     HASH  (with them) units used per calendar day: '<i>:<day start ms>'
KEYS[next] pool quota HASH (with them, tools in a pool) the same for the pool's quotas
KEYS[next] fair      (tools or pools with `fair_by`) six keys: finish ZSET, queue ZSET,
                      parked ZSET, cost HASH, clock STRING, weights HASH (live weights, no
                      TTL; see "Fair sharing" below)
KEYS[last] receipts  HASH  (when a receipt is passed) member -> the receipt of the delivery
                      that was admitted
  (all keys share one hash tag: the pool's, or the tool's)

ARGV[1]  member       the task id (a redelivered task is never counted twice)
ARGV[2]  cost         units this call uses (> 0)
ARGV[3]  deadline_ms  the longest wait allowed; a later slot means fallback (negative once
                      the deadline has passed: a new call then falls back even if free)
ARGV[4]  gap_ms       0 for earliest-slot pacing, else the spacing of delayed calls
ARGV[5]  margin_ms    slot margin: admissions are checked against window + margin/2, so
                      a body starting up to margin/2 after its admission still keeps the
                      limit; reservations are placed window + margin apart, so a call that
                      comes back up to margin/2 late does not hold up the calls behind it
ARGV[6]  now_ms       '' to use the server clock (TIME, in whole ms rounded down, as every
                      script reads it); a pinned time in tests only
ARGV[7]  n            number of limits, then n pairs:
ARGV[6+2i], ARGV[7+2i]  max units, window ms
then     p            number of pool limits, then p pairs: the class's allowance (share x
                      max) and window ms; then the concurrency cap (0: none) and lease ms
then     (optional) the live limits' fields: the tool's, the key value's tier ('' for none),
                      the pool's ('' for none), and the class's share of the pool; then the
                      number q of calendar quotas, the starts of yesterday, today, tomorrow
                      and the day after in one argument ('<ms> <ms> <ms> <ms>', around the
                      worker's clock), each quota's max units per day, the number pq of the
                      pool's quotas and each one's allowance (share x max) (throttle/quotas.py)
then     (fair sharing only) 'fair', the tenant (a digest), its weight and the horizon ms
last     receipt      '' for none, else '<message tag>|<delivery nonce>': the tag names the
                      message (kept when the broker delivers it again; may be empty), the
                      nonce this delivery of it

Returns {action, wait_ms, slot_ms, reason}: action is 'admit', 'delay' or 'fallback';
wait_ms and slot_ms are decimal strings (slot_ms is the admission time or reserved slot).
Reasons: admitted, reservation, readmitted, rerun, reused | reserved, early, late, pool,
concurrency, cooldown, quota, parked | deadline, cost_exceeds_limit, cooldown, quota.

An admitted member asking again is 'readmitted' when its receipt is the one recorded at
admission (the same delivery, whose answer was lost) or when no receipt is passed. With
another receipt it is a 'rerun' when the message tag is the recorded one (the same message
delivered again) and else 'reused' (another message with the same id); the worker decides
what each may do.

During a cooldown no call is admitted: new calls, and reserved calls whose slot falls
inside it, are told to come back when it ends (without a reservation: they are placed
then, in the order they return), or fall back when it outlasts their deadline.

Pool waits: a class admits only while the pool's use in each window plus the call's cost
stays within its allowance. A call the pool holds back gets a slot in the pool log (as a
tool reservation, not before the pool's latest slot) within its class's allowance, and the
same slot in the tool log, so it is re-delivered about once. A class's reservations count
only against its own allowance, so a higher class keeps its head-room and may still take
capacity at admission; a lower class's reserved call then waits again (placed anew).

Windows are half-open: an entry at score s counts in (t - window, t]. Admissions check the
trailing window of everything at or before now, so admitted units never exceed max in any
window even when reserved calls come back late; new arrivals are placed at the earliest slot
not before the latest one already taken (FIFO) that breaks no window.
]]

-- The decision's state, set at the start of every call by read_args() and prepare(). (As a
-- Redis function library, FCALL, these locals outlive a call, and the functions below are
-- built once, when the library loads; as a script, EVALSHA, every call builds them again.)
local K, A  -- the call's keys and arguments
local log, adm, costs, member, cost, deadline, gap, margin, now
local n, maxes, windows, longest, at_arg, pn, allowances, pool_windows, pool_longest
local cap, lease_ms, receipt, receipts, nkeys, fair, fair_keys, fair_weights, pool_quota
local extra_at, live_fields, live_quotas, live_pool_quotas, calls_at
local quota_key, qn, days, quota_max, pool_quota_max, pqn, quotas_on
local pool_log, pool_costs, leases, cooldown_at, cool_until, free, known_held
local weighted, pool_weighted, freed_on
local known_latest, known_own, known_pool_free, known_waiting, fresh_log
local fair_finish, fair_queue, fair_parked, fair_costs, fair_clock
local tenant, fair_weight, horizon, fair_grace, fair_tag, fair_new
local LATE_GRACE_MS = 1000
local FAIR_MIN_WAIT_MS = 50  -- a parked call never comes back sooner (no spinning)


-- Live limits (`throttle limits set`, throttle/overrides.py): a value in the limits hash,
-- under this decision's own hash tag, replaces the limits passed above, in this same call.
-- A key value's tier wins over the tool's override; the pool's override is scaled by the
-- class's share. Values are "max window_ms max window_ms ...", a daily quota "max d"; each
-- kind a value gives (sliding limits, quotas) replaces the one passed, the other stands.
local function fmt_day(ms) return string.format('%d', ms) end
-- nil for a value that is not all positive numbers: the limits passed above then stand.
local function parse(text, scale)
  local ms, ws, count, qs = {}, {}, 0, {}
  for m, w in string.gmatch(text, '(%S+) (%S+)') do
    local max, window = tonumber(m), (w == 'd') and 1 or tonumber(w)
    if not (max and window and max > 0 and window > 0 and max < math.huge
            and window < math.huge) then return nil end  -- (NaN fails every comparison)
    if w == 'd' then
      qs[#qs + 1] = max * scale
    else
      count = count + 1
      ms[count], ws[count] = max * scale, window
    end
  end
  if count == 0 and #qs == 0 then return nil end
  return ms, ws, count, qs
end
-- Adaptive limits (throttle/adaptive.py, adapt.lua): what the upstream reported, stored
-- as "until_ms max window_ms ...", is added beside the limits above, so the lower one
-- binds: never above the file's or an override, which it leaves in place. Stale (the
-- upstream has not answered for a while) after until_ms.
local function learned(text, scale)
  local until_ms, rest = string.match(text, '^(%S+) (.*)$')
  if not (tonumber(until_ms) and tonumber(until_ms) > now) then return nil end
  return parse(rest, scale)
end

-- Read the call's arguments and the live limits (HMGET) into the state above.
local function read_args()
  log, adm, costs = K[1], K[2], K[3]
  member = A[1]
  cost = (A[2] + 0)
  deadline = (A[3] + 0)
  gap = (A[4] + 0)
  margin = (A[5] + 0)
  now = tonumber(A[6])
  if not now then
    local time = redis.call('TIME')
    now = time[1] * 1000 + math.floor(time[2] / 1000)
  end
  n = (A[7] + 0)
  maxes, windows, longest = {}, {}, 0
  for i = 1, n do
    maxes[i] = (A[6 + 2 * i] + 0)
    windows[i] = (A[7 + 2 * i] + 0)
    if windows[i] > longest then longest = windows[i] end
  end
  at_arg = 8 + 2 * n
  pn = (A[at_arg] + 0)
  allowances, pool_windows, pool_longest = {}, {}, 0
  for i = 1, pn do
    allowances[i] = (A[at_arg - 1 + 2 * i] + 0)
    pool_windows[i] = (A[at_arg + 2 * i] + 0)
    if pool_windows[i] > pool_longest then pool_longest = pool_windows[i] end
  end
  cap = (A[at_arg + 1 + 2 * pn] + 0)
  lease_ms = (A[at_arg + 2 + 2 * pn] + 0)
  -- A receipt (the last argument) comes with its key (the last key).
  receipt = A[#A] or ''
  receipts = nil
  nkeys = #K
  if receipt ~= '' then
    receipts = K[nkeys]
    nkeys = nkeys - 1
  end
  -- Fair sharing: its four arguments and six keys come just before the receipt's.
  fair = A[#A - 4] == 'fair'
  fair_keys, fair_weights = nil, nil
  if fair then
    fair_keys = {K[nkeys - 5], K[nkeys - 4], K[nkeys - 3], K[nkeys - 2],
                 K[nkeys - 1]}
    fair_weights = K[nkeys]
    nkeys = nkeys - 6
  end
  -- A pooled call's keys end (before the fair keys and the receipts) with the pool's quota hash.
  pool_quota = nil
  if pn > 0 then
    pool_quota = K[nkeys]
    nkeys = nkeys - 1
  end
  extra_at = at_arg + 3 + 2 * pn
  live_fields = A[extra_at]
  live_quotas, live_pool_quotas = nil, nil  -- replace the quotas passed below, when set
  if live_fields then
    local live = redis.call('HMGET', K[nkeys - 1], live_fields, A[at_arg + 4 + 2 * pn],
                            A[at_arg + 5 + 2 * pn], 'adaptive:' .. live_fields,
                            'adaptive:' .. A[at_arg + 5 + 2 * pn])
    local share = tonumber(A[at_arg + 6 + 2 * pn])  -- (read before an override changes pn)
    local ms, ws, count, qs
    if live[2] then ms, ws, count, qs = parse(live[2], 1) end  -- the tier, else the tool's
    if not ms and live[1] then ms, ws, count, qs = parse(live[1], 1) end
    if ms and count > 0 then maxes, windows, n = ms, ws, count end
    if ms and #qs > 0 then live_quotas = qs end
    if live[3] and pn > 0 then
      local ms, ws, count, qs = parse(live[3], tonumber(A[at_arg + 6 + 2 * pn]))
      if ms and count > 0 then allowances, pool_windows, pn = ms, ws, count end
      if ms and #qs > 0 then live_pool_quotas = qs end
    end
    local ams, aws, acount = nil, nil, 0
    if live[4] then ams, aws, acount = learned(live[4], 1) end
    for i = 1, (ams and acount or 0) do n = n + 1; maxes[n], windows[n] = ams[i], aws[i] end
    ams = nil
    if live[5] and pn > 0 then ams, aws, acount = learned(live[5], share) end
    for i = 1, (ams and acount or 0) do
      pn = pn + 1; allowances[pn], pool_windows[pn] = ams[i], aws[i]
    end
    longest, pool_longest = 0, 0
    for i = 1, n do if windows[i] > longest then longest = windows[i] end end
    for i = 1, pn do if pool_windows[i] > pool_longest then pool_longest = pool_windows[i] end end
  end
  calls_at = nkeys - (live_fields and 2 or 0) - 1

  -- Calendar quotas (throttle/quotas.py): units per calendar day, charged to the day of a
  -- call's slot when it takes the slot and given back when a reserved call is dropped. A
  -- pool's quotas count every tool of the pool; a class may use its allowance of them.
  quota_key = K[nkeys]
  qn = tonumber(A[extra_at + 4]) or 0
  days, quota_max, pool_quota_max = {}, {}, {}
  for i = 1, qn do quota_max[i] = tonumber(A[extra_at + 5 + i]) end
  pqn = tonumber(A[extra_at + 6 + qn]) or 0
  for i = 1, pqn do pool_quota_max[i] = tonumber(A[extra_at + 6 + qn + i]) end
  if live_quotas then quota_max, qn = live_quotas, #live_quotas end
  if live_pool_quotas then pool_quota_max, pqn = live_pool_quotas, #live_pool_quotas end
  if not pool_quota then pqn = 0 end
  if qn > 0 or pqn > 0 then  -- (parsed only when a quota is in force)
    for bound in string.gmatch(A[extra_at + 5] or '', '%d+') do
      days[#days + 1] = tonumber(bound)
    end
    if not days[4] then qn, pqn = 0, 0 end  -- (a caller without the quota arguments)
  end
  quotas_on = qn > 0 or pqn > 0
end

local function day_of(t)  -- the start and end of the calendar day holding t
  if t >= days[3] then return days[3], days[4] end
  if t >= days[2] then return days[2], days[3] end
  return days[1], days[2]
end
-- When the day of `t` has no room left for this call: that day's end; else nil.
local function quota_spent_until(t)
  local start, stop = day_of(t)
  for i = 1, qn do
    local used = tonumber(redis.call('HGET', quota_key, i .. ':' .. fmt_day(start)) or '0')
    if used + cost > quota_max[i] then return stop end
  end
  for i = 1, pqn do
    local used = tonumber(redis.call('HGET', pool_quota, i .. ':' .. fmt_day(start)) or '0')
    if used + cost > pool_quota_max[i] then return stop end
  end
  return nil
end
-- Add `units` to the day of `t` in `hash`'s first `count` quotas (never below 0: a quota set
-- live may be given back units it never charged).
local function charge_in(hash, count, t, units)
  local start = day_of(t)
  for i = 1, count do
    local field = i .. ':' .. fmt_day(start)
    if tonumber(redis.call('HINCRBYFLOAT', hash, field, units)) < 0 then
      redis.call('HSET', hash, field, '0')
    end
    if start > days[1] then redis.call('HDEL', hash, i .. ':' .. fmt_day(days[1])) end
  end
  redis.call('PEXPIRE', hash, math.ceil(days[4] - now) + 86400000)
end
local function charge(t, units)
  if qn > 0 then charge_in(quota_key, qn, t, units) end
  if pqn > 0 then charge_in(pool_quota, pqn, t, units) end
end


-- Trim what no window can see any more; unused reservations expire with it. Returns whether
-- the hash holds costs (units.lua), and how many entries went.
local function trim(zset, hash, before)
  local fields = redis.call('HLEN', hash)
  if fields == 0 then
    sums[hash] = false
    return false, redis.call('ZREMRANGEBYSCORE', zset, '-inf', fmt(before))
  end
  local gone = redis.call('ZRANGEBYSCORE', zset, '-inf', before)
  if #gone == 0 then return true, 0 end
  local w = weighing()
  if w.kept(hash) then w.add(hash, -w.sum_of(hash, gone, 1), -#gone) end
  for first = 1, #gone, CHUNK do
    fields = fields - redis.call('HDEL', hash,
                                 unpack(gone, first, math.min(#gone, first + CHUNK - 1)))
  end
  if fields == 1 and w.kept(hash) then  -- only the sum is left: every entry weighs 1 again
    redis.call('HDEL', hash, TOTAL)
    sums[hash], fields = false, 0
  end
  return fields > 0, redis.call('ZREMRANGEBYSCORE', zset, '-inf', fmt(before))
end

-- Read the cooldown, check for room (the no-op ZADD), and trim what no window sees.
local function prepare()
  pool_log, pool_costs = K[4], K[5]
  leases = K[4]
  if pn > 0 then leases = K[6] end
  cooldown_at = 4 + (pn > 0 and 2 or 0) + (cap > 0 and 1 or 0)
  cool_until = tonumber(redis.call('GET', K[cooldown_at]) or '0')
  free = K[cooldown_at + 1]
  -- A store at maxmemory (noeviction) refuses the script here, before its first write, as it
  -- refuses any write that could grow memory: a no-op ZADD (XX INCR 0 changes nothing) is
  -- that check. Without it the trims below (deletions) would let every later write through.
  -- It also answers the member's log entry (false for a new call), which the decision starts
  -- from.
  known_held = redis.call('ZADD', log, 'XX', 'INCR', '0', member)
  for i = 1, n do windows[i] = windows[i] + margin / 2 end
  -- The pool's windows get the same half margin: the upstream counts a call when it arrives.
  for i = 1, pn do pool_windows[i] = pool_windows[i] + margin / 2 end
  pool_longest = pool_longest + margin
  longest = longest + margin
  if receipts then
    local noted = redis.call('HLEN', receipts)
    if noted > 0 then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', log, '-inf', now - longest)) do
        redis.call('HDEL', receipts, m)
      end
    end
    if noted > redis.call('ZCARD', log) then  -- members taken out otherwise (a cooldown)
      for _, m in ipairs(redis.call('HKEYS', receipts)) do
        if not redis.call('ZSCORE', log, m) then redis.call('HDEL', receipts, m) end
      end
    end
  end
  local trimmed
  weighted, trimmed = trim(log, costs, now - longest)
  -- An admission's entry in adm has the score of its log entry: none is older than the log's.
  if trimmed > 0 then redis.call('ZREMRANGEBYSCORE', adm, '-inf', fmt(now - longest)) end
  if known_held and tonumber(known_held) <= now - longest then known_held = false end  -- trimmed
  pool_weighted = pn > 0 and trim(pool_log, pool_costs, now - pool_longest)
  freed_on = not known_held and pn == 0 and not quotas_on
end


-- Walking the entries of `zset` in (lo, hi] (text bounds) from the oldest, in pages that
-- double: the score of the one at which the units of the entries `counts` accepts (all, when
-- nil) reach `excess`; nil when they never do. (The paths that walk: a held call's, a
-- weighted log's.)
local function reach(zset, hash, heavy, lo, hi, excess, counts)
  local freed, offset, size = 0, 0, 32
  repeat
    local page = redis.call('ZRANGEBYSCORE', zset, lo, hi, 'WITHSCORES', 'LIMIT',
                            string.format('%d', offset), string.format('%d', size))
    local units = heavy and weighing().units_of(hash, page, 2)
    for i = 1, #page, 2 do
      local score = tonumber(page[i + 1])
      if not counts or counts(page[i], score) then
        freed = freed + (heavy and units[i] or 1)
        if freed >= excess then return score end
      end
    end
    local last = #page < 2 * size
    offset, size = offset + size, size * 2
  until last
  return nil
end

-- Earliest t >= `from` at which the entries of `zset` in (t - window, upto] (all <= t),
-- without `skip`, leave room for `cost` under `max`. nil when cost alone exceeds max.
local function earliest_in(zset, hash, heavy, from, upto, max, window, skip)
  if cost > max then return nil end
  if not heavy and not skip and not upto and max % 1 == 0 and cost % 1 == 0 then
    -- The same answer in one lookup by rank: the entries after the window's floor are the
    -- newest, so the window is too full when the newest but k = max - cost lies in it, and
    -- that entry is the one that must leave (the count below less k is its place from the
    -- oldest). Whole numbers only: then k is exact. (No text bounds: fmt is ~0.5 µs.)
    local k = max - cost
    local rank = k < 9007199254740992 and string.format('%d', k) or k  -- (exact below 2^53)
    local entry = redis.call('ZREVRANGE', zset, rank, rank, 'WITHSCORES')
    if not entry[2] or tonumber(entry[2]) <= from - window then return from end
    return tonumber(entry[2]) + window
  end
  local floor = fmt(from - window)
  local lo = '(' .. floor
  local hi = upto and fmt(upto) or '+inf'
  if not heavy then
    -- Unit costs: count, then fetch only the entry that must leave the window.
    local used = redis.call('ZCOUNT', zset, lo, hi)
    local skip_rank = nil
    if skip then
      local s = tonumber(redis.call('ZSCORE', zset, skip))
      if s and s > tonumber(floor) and (not upto or s <= upto) then
        used = used - 1
        skip_rank = redis.call('ZRANK', zset, skip) - redis.call('ZCOUNT', zset, '-inf', floor)
      end
    end
    local excess = used + cost - max
    if excess <= 0 then return from end
    local offset = math.ceil(excess) - 1
    if skip_rank and skip_rank <= offset then offset = offset + 1 end
    local entry = redis.call('ZRANGEBYSCORE', zset, lo, hi, 'WITHSCORES', 'LIMIT',
                             string.format('%d', offset), '2')
    if entry[1] == skip then return tonumber(entry[4]) + window end
    return tonumber(entry[2]) + window
  end
  -- Weighted: the window's units less the skipped member's, then the entry whose leaving
  -- frees enough.
  local used = weighing().units_in(zset, hash, from - window, upto,
                                   cost % 1 == 0 and max % 1 == 0, now, window)
  local s = skip and tonumber(redis.call('ZSCORE', zset, skip))
  if s and s > from - window and (not upto or s <= upto) then
    used = used - (tonumber(redis.call('HGET', hash, skip)) or 1)
  end
  local excess = used + cost - max
  if excess <= 0 then return from end
  local at = reach(zset, hash, true, lo, hi, excess, skip and function(m) return m ~= skip end)
  return at and at + window
end

local function earliest(from, max, window)
  return earliest_in(log, costs, weighted, from, nil, max, window, nil)
end

-- Keys live until their latest entry has left every window. A TTL is only ever raised,
-- and then with a window of headroom, so most calls just read it.
local function keep(key, last)
  local needed = math.ceil(last - now + longest) + 1000
  if redis.call('PTTL', key) < needed then
    redis.call('PEXPIRE', key, math.ceil(needed + longest))  -- (windows may be fractional ms)
  end
end
-- While adm exists, the log and adm share one TTL (`ttl`, adm's), raised for both at once.
-- A log found empty (`fresh_log`: its entries all trimmed or taken out, so it had no TTL any
-- more) holds no reservation: adm, if left, goes.
local function adm_ttl_now()
  if fresh_log then
    redis.call('ZREMRANGEBYSCORE', adm, '-inf', '+inf')
    return -2
  end
  return redis.call('PTTL', adm)
end
local function keep_both(last, ttl)
  local needed = math.ceil(last - now + longest) + 1000
  if ttl < needed then
    local raised = math.ceil(needed + longest)
    redis.call('PEXPIRE', log, raised)
    redis.call('PEXPIRE', adm, raised)
  end
end
-- A reservation at `last`, its log entry made. The first one while adm does not exist names
-- every other entry of the log in adm (all admissions then) beside the member '' at +inf.
local function expire(last)
  local ttl = adm_ttl_now()
  if ttl == -2 then
    local entries = redis.call('ZRANGE', log, '0', '-1', 'WITHSCORES')
    local marks = {'+inf', ''}
    for i = 1, #entries, 2 do
      if entries[i] ~= member then
        marks[#marks + 1], marks[#marks + 2] = entries[i + 1], entries[i]
      end
      if #marks >= 2 * CHUNK then redis.call('ZADD', adm, unpack(marks)); marks = {} end
    end
    if #marks > 0 then redis.call('ZADD', adm, unpack(marks)) end
    ttl = redis.call('PTTL', log)
    if ttl > 0 then redis.call('PEXPIRE', adm, ttl) end
  end
  keep_both(last, ttl)
  if cost ~= 1 then keep(costs, last) end
end
-- An admission at `at` (now, as text): named in adm while adm exists (the log may hold
-- reservations then); else the log alone holds it. `ttl`: adm's PTTL, when just read.
local function expire_admitted(at, ttl)
  ttl = ttl or adm_ttl_now()
  if ttl == -2 then
    keep(log, now)
  else
    redis.call('ZADD', adm, at, member)
    keep_both(now, ttl)
  end
  if cost ~= 1 then keep(costs, now) end
end
-- Note which delivery was admitted (it leaves with the member's log entry).
local function note_receipt()
  if receipts then
    redis.call('HSET', receipts, member, receipt)
    keep(receipts, now)
  end
end

-- A decided call (admitted or refused) leaves the tool's registry of undecided calls.
-- `.delay()` registers in the background (throttle/registrar.py), so with the decided key
-- (a third registry key) a call not in the registry may be registered later: it is noted
-- there for DECIDED_MS (the registrar sends nothing older than its LATE_S), and
-- register.lua drops that late registration. The set is trimmed by expiry and bounded.
local function forget_decided(answer)
  if answer[1] ~= 'delay' and calls_at >= cooldown_at + 2 then
    if redis.call('ZREM', K[cooldown_at + 2], member) == 1 then
      redis.call('HDEL', K[cooldown_at + 3], member)
    elseif calls_at >= cooldown_at + 3 then
      local decided, DECIDED_MS, MOST = K[cooldown_at + 4], 120000, 100000
      redis.call('ZREMRANGEBYSCORE', decided, '-inf', now)
      if redis.call('ZADD', decided, now + DECIDED_MS, member) == 1
          and redis.call('ZCARD', decided) > MOST then
        redis.call('ZREM', decided, redis.call('ZRANGE', decided, '0', '0')[1])
      end
      redis.call('PEXPIRE', decided, DECIDED_MS)
    end
  end
  return answer
end

-- For a due reservation (slot `mine`): when the trailing window (t - window, now] holds
-- it, counting admissions and the due reservations ahead of it (slot <= mine), but not
-- itself nor the due reservations behind it: those wait for the capacity after it, so
-- calls held up by late ones are admitted in order, each once.
local function due_free_at(max, window, mine)
  if cost > max then return nil end
  local floor = now - window
  local lo = '(' .. fmt(floor)
  -- Within the window: every entry, less itself and (when it does not fit without them)
  -- the due reservations behind it.
  local used
  if weighted then
    used = weighing().units_in(log, costs, floor, now, cost % 1 == 0 and max % 1 == 0, now,
                               window)
    if mine > floor then used = used - (tonumber(redis.call('HGET', costs, member)) or 1) end
  else
    used = redis.call('ZCOUNT', log, lo, now)
    if mine > floor then used = used - 1 end
  end
  if used + cost > max then
    -- (The due reservations behind it: the log's entries there that are not admissions.)
    local behind = '(' .. fmt(math.max(mine, floor))
    if weighted then
      local admitted, due = {}, {}
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', adm, behind, now)) do admitted[m] = true end
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', log, behind, now)) do
        if not admitted[m] then due[#due + 1] = m end
      end
      used = used - weighing().sum_of(costs, due, 1)
    else
      used = used - redis.call('ZCOUNT', log, behind, now)
                  + redis.call('ZCOUNT', adm, behind, now)
    end
  end
  local excess = used + cost - max
  if excess <= 0 then return now end
  -- Blocked: the entry whose leaving frees enough, from the window's oldest.
  local at = reach(log, costs, weighted, lo, now, excess, function(m, score)
    return m ~= member and not (score > mine and not redis.call('ZSCORE', adm, m))
  end)
  return at and at + window
end

-- When the pool lets this call's class admit it (now, or the time enough use expires).
-- `skip`: the member, when it has an entry in the pool log (else nil: nothing to skip).
local function pool_free_at(skip)
  local t = now
  for i = 1, pn do
    local at = earliest_in(pool_log, pool_costs, pool_weighted, now, now, allowances[i],
                           pool_windows[i], skip)
    if at == nil then return nil end
    if at > t then t = at end
  end
  return t
end

-- When a concurrency lease is free (now, or when the first running one ends).
local function lease_free_at()
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) < cap then return now end
  return tonumber(redis.call('ZRANGE', leases, '0', '0', 'WITHSCORES')[2])
end

local pool_wait  -- defined with the pool waits below

-- The pool log's TTL only ever grows: it holds reservations up to `last`.
local function keep_pool(last)
  local needed = math.ceil(last - now + pool_longest) + 1000
  if redis.call('PTTL', pool_log) < needed then
    redis.call('PEXPIRE', pool_log, math.ceil(needed + pool_longest))
  end
  if (pool_weighted or cost ~= 1) and redis.call('PTTL', pool_costs) < needed then
    redis.call('PEXPIRE', pool_costs, math.ceil(needed + pool_longest))
  end
end

-- Record the admission everywhere it counts. Returns its time as text (for the answer).
local function admit()
  local at = fmt(now)
  log_put(log, costs, at, member, cost)
  if pn > 0 then
    log_put(pool_log, pool_costs, at, member, cost)
    keep_pool(now)
  end
  if cap > 0 then
    redis.call('ZADD', leases, now + lease_ms, member)
    redis.call('PEXPIRE', leases, math.ceil(lease_ms) + 1000)
  end
  return at
end


-- Fast path: a new call admitted at once, on a tool without cost weights (and, with fair
-- sharing, while no call waits: its turn is then now), gets the answer decide_new() below
-- would give (through quota_spent_until(), blocked(), admit(), charge() and fair_after()),
-- or nil. What it reads first, it hands on to the other paths (known_latest, known_own,
-- known_pool_free, known_waiting) when the call goes on.
local function fast_admit()
  known_latest, known_own, known_pool_free, fresh_log = nil, nil, nil, false
  known_waiting = fair and not known_held and redis.call('ZCARD', fair_keys[2])
  if not weighted and not pool_weighted and (not fair or known_waiting == 0) and deadline >= 0
      and cool_until <= now and not known_held then
    known_latest = redis.call('ZREVRANGE', log, '0', '0', 'WITHSCORES')
    fresh_log = not known_latest[2]
    local fits = not (known_latest[2] and tonumber(known_latest[2]) > now)
    for i = 1, (fits and n or 0) do
      if earliest(now, maxes[i], windows[i]) ~= now then fits = false; break end
    end
    if fits and quotas_on and quota_spent_until(now) then fits = false end
    if fits and pn > 0 then  -- as pool_wait(now)
      known_own = tonumber(redis.call('ZSCORE', pool_log, member)) or false
      if known_own and known_own > now then
        fits = false
      else
        known_pool_free = pool_free_at(known_own and member)
        fits = known_pool_free ~= nil and known_pool_free <= now
      end
    end
    if fits and cap > 0 then fits = lease_free_at() <= now end  -- (and again in blocked())
    if fits then
      local at = admit()
      charge(now, cost)
      expire_admitted(at)
      note_receipt()
      -- (fair_after: nothing waits, so no tenant keeps an entry)
      if fair then redis.call('ZREMRANGEBYSCORE', fair_keys[1], '-inf', '+inf') end
      return forget_decided({'admit', '0', at, 'admitted'})
    end
  end
end


-- Admission is blocked by the pool or the concurrency cap: the wait, or a fallback.
local function blocked()
  local held = pn > 0 and pool_wait(now)
  if held then return held end
  local free = cap > 0 and lease_free_at() or now
  if free > now then
    local wait = math.min(free - now, 250)
    return {'delay', fmt(wait), fmt(now + wait), 'concurrency'}
  end
  return nil
end

-- The upstream asked for a pause: come back when it ends, or fall back.
local function cooled()
  local wait = cool_until - now
  if wait > deadline then return {'fallback', '0', fmt(cool_until), 'cooldown'} end
  return {'delay', fmt(wait), fmt(cool_until), 'cooldown'}
end

-- Whether a call placed at `s` leaves every window of `zset` that would hold it, (x - w, x]
-- for x from s up to s + w, within `max`. Entries on both sides of `s` count: later
-- reservations lie ahead of it.
-- (fits_in, fits_at and take_freed serve new calls of a tool without a pool or quota.)
local function fits_in(zset, hash, heavy, s, max, w)
  local page = redis.call('ZRANGEBYSCORE', zset, '(' .. fmt(s - w), '(' .. fmt(s + w),
                          'WITHSCORES')
  local times, units = {}, {}
  local weights = heavy and weighing().units_of(hash, page, 2)
  for j = 1, #page, 2 do
    times[#times + 1] = tonumber(page[j + 1])
    units[#units + 1] = heavy and weights[j] or 1
  end
  local hi, lo, sum = 1, 1, 0
  local function held_at(x)  -- units in (x - w, x]; x only grows
    while hi <= #times and times[hi] <= x do sum = sum + units[hi]; hi = hi + 1 end
    while lo < hi and times[lo] <= x - w do sum = sum - units[lo]; lo = lo + 1 end
    return sum
  end
  if held_at(s) + cost > max then return false end
  for j = 1, #times do
    if times[j] >= s and held_at(times[j]) + cost > max then return false end
  end
  return true
end

-- Whether a call placed at `s` fits every tool limit (w = window + margin, as reservations
-- are placed).
local function fits_at(s)
  for i = 1, n do
    if not fits_in(log, costs, weighted, s, maxes[i], windows[i] + margin / 2) then
      return false
    end
  end
  return true
end

-- A slot a released reservation gave back (a revoked call's), for a new call whose own
-- slot `t` would come later, if the windows still hold it (admissions and reservations
-- made since may have used its units). New calls are otherwise placed after the latest
-- slot taken (FIFO), and a freed slot before it would stay idle.
local function take_freed(t)
  if redis.call('ZCARD', free) == 0 then return nil end  -- (no slot was given back)
  redis.call('ZREMRANGEBYSCORE', free, '-inf', math.max(now, cool_until))
  local slots = redis.call('ZRANGEBYSCORE', free, '(' .. fmt(now), fmt(now + deadline),
                           'WITHSCORES', 'LIMIT', '0', '16')
  for i = 1, #slots, 2 do
    local units = tonumber(string.match(slots[i], '^([^:]+):'))
    local at = tonumber(slots[i + 1])
    if at >= t then break end
    if units and units >= cost and fits_at(at) then
      t = at
      redis.call('ZREM', free, slots[i])
      if units > cost then redis.call('ZADD', free, t, fmt(units - cost) .. ':' .. member) end
      log_put(log, costs, t, member, cost)
      expire(t)
      return {'delay', fmt(t - now), fmt(t), 'reserved'}
    end
  end
  return nil
end

-- Pool waits ---------------------------------------------------------------------------
-- A call the pool holds back is not told to poll the pool again (every held call would come
-- back when one unit frees): it gets a slot in the pool log, placed like a tool reservation
-- (not before the pool's latest slot, the pool's windows plus margin holding it within its
-- class's allowance), and the same slot in the tool log, so it returns once, through the
-- reservation path. Its pool entry then counts like an admission for everyone: a class's
-- reservations fill at most its own allowance, so a higher class keeps its head-room and
-- may still admit at once; a reserved call that finds its class's allowance taken when it
-- comes back is placed anew. A new call is admitted whenever the pool's trailing windows
-- hold it (the reservations that are due count, those ahead do not: a higher class must not
-- wait for a lower one's reservations).

-- The earliest slot from `from`, not before the pool's latest one, that the pool's windows
-- hold within this class's allowance; nil when the cost alone exceeds it.
local function pool_slot(from)
  local start = from
  local last = redis.call('ZREVRANGE', pool_log, '0', '0', 'WITHSCORES')
  if last[2] and tonumber(last[2]) > start then start = tonumber(last[2]) end
  local t = start
  for i = 1, pn do
    local at = earliest_in(pool_log, pool_costs, pool_weighted, start, nil, allowances[i],
                           pool_windows[i] + margin / 2, nil)
    if at == nil then return nil end
    if at > t then t = at end
  end
  return t
end

-- nil when the pool lets the call run now (from = now); else the call's answer: a delay to
-- its pool slot (reserved in the pool and tool logs), or a fallback. `from` is the call's
-- tool slot: a call the tool delays is placed in the pool from there.
pool_wait = function(from)
  local own = known_own  -- (false for no entry, when the fast path read it)
  if own == nil then own = tonumber(redis.call('ZSCORE', pool_log, member)) end
  if from <= now then
    if own and own > now then return {'delay', fmt(own - now), fmt(own), 'pool'} end
    local free = known_pool_free or pool_free_at(own and member)  -- (own: its ZSCORE)
    if free == nil then return {'fallback', '0', fmt(now), 'cost_exceeds_limit'} end
    if free <= now then return nil end
  end
  if own then log_drop(pool_log, pool_costs, member) end
  local t = pool_slot(math.max(from, now))
  if t == nil then return {'fallback', '0', fmt(now), 'cost_exceeds_limit'} end
  if t - now > deadline then return {'fallback', '0', fmt(t), 'deadline'} end
  log_put(pool_log, pool_costs, t, member, cost)
  keep_pool(t)
  -- (A held member here is a reservation: a calendar quota counts the call's slot.)
  if known_held then charge(tonumber(known_held), -cost) end
  charge(t, cost)
  log_put(log, costs, t, member, cost)
  expire(t)
  return {'delay', fmt(t - now), fmt(t), 'pool'}
end
-- -----------------------------------------------------------------------------------------

-- Fair sharing -------------------------------------------------------------------------
-- (tools or pools with `fair_by`; docs/gate.md, "Fair sharing".) Start-time fair queueing
-- over a reservation horizon: a new call of tenant k gets the virtual start tag
-- S = max(V, F_k) and moves F_k to S + cost / weight; it takes its slot (the path above:
-- admitted now or reserved) only when that slot, plus the units of the calls waiting with
-- lower tags placed at the full rate, lies within now + horizon. Otherwise it is parked:
-- told when it may come back (an estimate, no reservation), keeping its tag. V is the tag
-- of the latest call given a slot; a tenant whose F_k <= V is idle and has no entry, and
-- when no call waits at all, no tenant has one.
local function read_fair()
  fair_tag, fair_new = nil, false  -- this call's tag; whether it was not waiting yet
  if fair then
    fair_finish, fair_queue, fair_parked = fair_keys[1], fair_keys[2], fair_keys[3]
    fair_costs, fair_clock = fair_keys[4], fair_keys[5]
    tenant, fair_weight = A[#A - 3], tonumber(A[#A - 2])
    horizon = tonumber(A[#A - 1]) + margin
    fair_grace = math.max(5000, 2 * horizon)  -- past its come-back time, a parked call is lost
  end
end

-- Keep the fair keys until `last` (ms) plus the grace; a TTL is only ever raised.
local function fair_keep(last)
  local needed = math.ceil(last - now + fair_grace + horizon)
  for _, key in ipairs(fair_keys) do
    if redis.call('PTTL', key) < needed then
      redis.call('PEXPIRE', key, math.ceil(needed + horizon))
    end
  end
end

-- A waiting call leaves the queue (it took a slot, fell back, or was lost).
local function fair_leave(m)
  redis.call('ZREM', fair_queue, m)
  redis.call('ZREM', fair_parked, m)
  redis.call('HDEL', fair_costs, m)
end

-- nil when the call may take its slot `t`; else its answer: parked, or a fallback.
local function fair_check(t)
  local waiting = known_waiting or redis.call('ZCARD', fair_queue)
  if waiting > 0 then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', fair_parked, '-inf', now)) do
      fair_leave(m)  -- parked calls that never came back
      waiting = waiting - 1
    end
  end
  fair_tag = waiting > 0 and tonumber(redis.call('ZSCORE', fair_queue, member))
  if not fair_tag then
    fair_new = true
    local live = tonumber(redis.call('HGET', fair_weights, tenant))  -- a live weight wins
    if live and live > 0 and live < math.huge then fair_weight = live end
    fair_tag = tonumber(redis.call('GET', fair_clock) or '0')
    if waiting > 0 then
      redis.call('ZREMRANGEBYSCORE', fair_finish, '-inf', fmt(fair_tag))  -- idle tenants
      local finish = tonumber(redis.call('ZSCORE', fair_finish, tenant) or '0')
      if finish > fair_tag then fair_tag = finish end
    end
  end
  -- The units waiting ahead of it (lower tags).
  local ahead = 0
  if waiting > 0 then
    if redis.call('HLEN', fair_costs) == 0 then
      ahead = redis.call('ZCOUNT', fair_queue, '-inf', '(' .. fmt(fair_tag))
    else
      local queued = redis.call('ZRANGEBYSCORE', fair_queue, '-inf', '(' .. fmt(fair_tag))
      ahead = weighing().sum_of(fair_costs, queued, 1)
    end
  end
  local slot = t
  if pn > 0 then
    local at = pool_slot(math.max(t, now))
    if at and at > slot then slot = at end
  end
  -- The full rate: the time one unit takes under the tightest limit (as slots are placed).
  local unit = 0
  for i = 1, n do unit = math.max(unit, (windows[i] + margin / 2) / maxes[i]) end
  for i = 1, pn do unit = math.max(unit, (pool_windows[i] + margin / 2) / allowances[i]) end
  local reach = slot + ahead * unit
  if reach <= now + horizon then return nil end
  if reach - now > deadline then return {'fallback', '0', fmt(reach), 'deadline'} end
  local back = math.max(now + FAIR_MIN_WAIT_MS, reach - horizon)
  return {'delay', fmt(back - now), fmt(back), 'parked'}
end

-- After the decision: a call still waiting (parked, or held by a cooldown, quota or cap)
-- keeps its tag and must come back by its answer's time plus the grace; one that took a
-- slot moves its tenant's finish tag and the virtual clock; either way it leaves the queue.
local function fair_after(answer)
  if not fair_tag then  -- not placed by fair_check (a cooldown, say): waiting already?
    fair_tag = redis.call('ZCARD', fair_queue) > 0
               and tonumber(redis.call('ZSCORE', fair_queue, member))
    if not fair_tag then return end
  end
  local action, reason = answer[1], answer[4]
  local finish = fair_tag + cost / fair_weight
  if action == 'delay' and reason ~= 'reserved' and reason ~= 'pool' then
    if fair_new then
      redis.call('ZADD', fair_queue, fmt(fair_tag), member)
      redis.call('ZADD', fair_finish, 'GT', fmt(finish), tenant)
      if cost ~= 1 then redis.call('HSET', fair_costs, member, cost) end
    end
    local back = tonumber(answer[3])
    redis.call('ZADD', fair_parked, fmt(back + fair_grace), member)
    fair_keep(back)
    return
  end
  if not fair_new then fair_leave(member) end
  if action == 'fallback' then return end
  if redis.call('ZCARD', fair_queue) == 0 then
    -- Nothing waits any more: every tenant is idle, and none keeps an entry.
    redis.call('ZREMRANGEBYSCORE', fair_finish, '-inf', '+inf')
    return
  end
  if fair_new then redis.call('ZADD', fair_finish, 'GT', fmt(finish), tenant) end
  local clock = tonumber(redis.call('GET', fair_clock) or '0')
  if fair_tag > clock then redis.call('SET', fair_clock, fmt(fair_tag)) end
  fair_keep(now)
end
-- -----------------------------------------------------------------------------------------

-- The decision, in two parts: a held member's and a new call's.
local function decide_held()
  local held = known_held  -- (read before the fast path)
  if held then
    -- Admitted already? (Without adm, the log holds no reservation.)
    local adm_ttl = redis.call('PTTL', adm)
    if adm_ttl == -2 or redis.call('ZSCORE', adm, member) then
      local again = 'readmitted'
      local noted = receipts and redis.call('HGET', receipts, member)
      if receipts and noted ~= receipt then
        local tag = receipt:match('^(.-)|')
        again = 'reused'
        if noted and tag and tag ~= '' and noted:match('^(.-)|') == tag then again = 'rerun' end
      end
      if cap > 0 then
        -- Run again (its worker was lost): it needs a lease like any other run.
        local lease = tonumber(redis.call('ZSCORE', leases, member))
        if not lease or lease <= now then
          local free = lease_free_at()
          if free > now then
            local wait = math.min(free - now, 250)
            return {'delay', fmt(wait), fmt(now + wait), 'concurrency'}
          end
        end
        redis.call('ZADD', leases, now + lease_ms, member)
      end
      note_receipt()
      return {'admit', '0', held, again}
    end
    local slot = tonumber(held)  -- (not admitted: its log entry is a reservation)
    -- Every refusal of a reservation gives it back, so a fallback needs no release.
    local function drop()
      log_drop(log, costs, member)
      if pn > 0 then  -- and its pool slot (pool waits)
        log_drop(pool_log, pool_costs, member)
      end
      charge(slot, -cost)
    end
    if slot < cool_until then
      drop()
      return cooled()
    end
    if slot > now then
      return {'delay', fmt(slot - now), fmt(slot), 'early'}
    end
    -- A reservation is due: it is admitted only if the trailing windows hold it now.
    local t = now
    for i = 1, n do
      local at = due_free_at(maxes[i], windows[i], slot)
      if at == nil then
        drop()
        return {'fallback', '0', fmt(now), 'cost_exceeds_limit'}
      end
      if at > t then t = at end
    end
    -- A reservation was promised within the deadline; lateness that is not the caller's
    -- gets a grace of LATE_GRACE_MS before the call falls back.
    if t - now > deadline + LATE_GRACE_MS then
      drop()
      return {'fallback', '0', fmt(t), 'deadline'}
    end
    if t > now then
      -- Held up by calls admitted late: the reservation keeps its place (and counts for
      -- the due calls behind it, which keeps them in order) until the window frees.
      return {'delay', fmt(t - now), fmt(t), 'late'}
    end
    local refused = blocked()
    if refused then
      if refused[1] == 'fallback' then drop() end
      return refused
    end
    local at = admit()
    expire_admitted(at, adm_ttl)
    note_receipt()
    return {'admit', '0', at, 'reservation'}
  end
end

local function decide_new()
  -- A new call: admitted now if nothing is reserved ahead and every window holds it;
  -- else the earliest slot, not before the latest one already taken (FIFO).
  if cool_until > now then return cooled() end
  local latest = known_latest or redis.call('ZREVRANGE', log, '0', '0', 'WITHSCORES')
  fresh_log = not latest[2]
  local start = now
  if latest[2] and tonumber(latest[2]) > start then start = tonumber(latest[2]) end
  local t = start
  for i = 1, n do
    local at
    if start > now and margin > 0 then
      -- (A slot ahead is placed by the pass with the margin below: here only the check.)
      if cost <= maxes[i] then at = start end
    else
      at = earliest(start, maxes[i], windows[i])
    end
    if at == nil then return {'fallback', '0', fmt(now), 'cost_exceeds_limit'} end
    if at > t then t = at end
  end
  if t > now and margin > 0 then
    t = start
    for i = 1, n do
      local at = earliest(start, maxes[i], windows[i] + margin / 2)
      if at > t then t = at end
    end
  end
  if t > now and gap > 0 and latest[2] then
    local paced = tonumber(latest[2]) + gap
    if paced > t then t = paced end
  end
  if fair then  -- a call whose turn has not come is parked (Fair sharing, above)
    local parked = fair_check(t)
    if parked then return parked end
  end

  if qn > 0 or pqn > 0 then
    -- The quota of the slot's day is spent: come back when it resets, or fall back.
    local reset = quota_spent_until(t)
    if reset then
      if reset - now > deadline then return {'fallback', '0', fmt(reset), 'quota'} end
      return {'delay', fmt(reset - now), fmt(reset), 'quota'}
    end
  elseif t > now and pn == 0 then  -- a pooled call is placed by the pool: no freed slot
    local freed = take_freed(t)
    if freed then return freed end
  end
  if t <= now then
    if deadline < 0 then return {'fallback', '0', fmt(now), 'deadline'} end
    local refused = blocked()
    if refused then return refused end
    local at = admit()
    charge(now, cost)
    expire_admitted(at)
    note_receipt()
    return {'admit', '0', at, 'admitted'}
  end
  if t - now > deadline then
    return {'fallback', '0', fmt(t), 'deadline'}
  end
  if pn > 0 then return pool_wait(t) end  -- the pool places it from its tool slot
  charge(t, cost)
  log_put(log, costs, t, member, cost)
  expire(t)
  return {'delay', fmt(t - now), fmt(t), 'reserved'}
end

-- One call's decision: its answer.
local function acquire(keys, args)
  K, A = keys, args
  sums = {}  -- (units.lua's, read afresh by every call)
  read_args()
  prepare()
  local answer = fast_admit()
  if answer then return answer end
  read_fair()
  answer = known_held and decide_held() or decide_new()
  if fair then fair_after(answer) end
  return forget_decided(answer)
end
