--[[ cooldown: the upstream asked for a pause (429/503 with a retry hint); no call of the
tool (or of its pool) is admitted until it ends, on any worker.

KEYS     the keys of acquire.lua: log, adm, cost[, pool log, pool cost][, leases], cooldown
ARGV[1]  member    the call the upstream refused ('' for none): its admission is removed
                   from every log (the upstream did not serve it) and its lease given back
ARGV[2]  pause_ms  how long the pause lasts from now
ARGV[3]  now_ms    '' to use the server clock (TIME); a pinned time in tests only
ARGV[4]  pooled    '1' when KEYS[4] and KEYS[5] are the pool's log and cost

Returns the end of the cooldown (ms), a decimal string. A cooldown is only ever extended.
]]

local member, pause = ARGV[1], tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local cooldown = KEYS[#KEYS]
local until_ms = now + pause
local current = tonumber(redis.call('GET', cooldown) or '0')
if current < until_ms then
  redis.call('SET', cooldown, string.format('%.3f', until_ms), 'PX', math.ceil(pause))
else
  until_ms = current
end
if member ~= '' then
  log_drop(KEYS[1], KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
  local rest = 4
  if ARGV[4] == '1' then
    log_drop(KEYS[4], KEYS[5], member)
    rest = 6
  end
  if rest < #KEYS then redis.call('ZREM', KEYS[rest], member) end
end
return string.format('%.3f', until_ms)
