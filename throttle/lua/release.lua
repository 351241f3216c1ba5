--[[ release: give back a reservation that will not be used (fallback, revoke).

KEYS[1]  log   ZSET  member = task id, score = admission time or reserved slot (ms)
KEYS[2]  adm   ZSET  the log's admissions, when it may hold reservations (acquire.lua)
KEYS[3]  cost  HASH  member -> units
KEYS[4]  free  ZSET  slots given back, member = '<units>:<task id>', score = slot (ms);
                     acquire.lua gives them to the next new calls
KEYS[5]  pool log   ZSET  (tools in a pool) the pool's entries; a held call's slot leaves it
KEYS[6]  pool cost  HASH  (tools in a pool) member -> units
ARGV[1]  member

Returns 1 when a reservation was freed, 0 when the member held none. An admission that
already happened is never released: its units were used. The freed slot is kept until it
passes (and a minute more), so a new call can take it instead of queueing behind the
latest reservation.
]]

local log, adm, costs, free = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member = ARGV[1]
local slot = redis.call('ZSCORE', log, member)
if not slot then return 0 end
-- An admission (without adm, the log holds no reservation)
if redis.call('ZSCORE', adm, member) or redis.call('PTTL', adm) == -2 then return 0 end
local units = redis.call('HGET', costs, member) or '1'
log_drop(log, costs, member)
if KEYS[6] then  -- a call the pool held back also gives back its unit of the pool
  log_drop(KEYS[5], KEYS[6], member)
end
redis.call('ZADD', free, slot, units .. ':' .. member)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = math.ceil(math.max(tonumber(slot) - now, 0)) + 60000
if redis.call('PTTL', free) < ttl then redis.call('PEXPIRE', free, ttl) end
return 1
