--[[ release: give back a reservation that will not be used (fallback, revoke).

KEYS[1]  log   ZSET  member = task id, score = admission time or reserved slot (ms)
KEYS[2]  rsv   ZSET  members holding a reservation not yet admitted
KEYS[3]  cost  HASH  member -> units
ARGV[1]  member

Returns 1 when a reservation was freed, 0 when the member held none. An admission that
already happened is never released: its units were used.
]]

local log, rsv, costs = KEYS[1], KEYS[2], KEYS[3]
local member = ARGV[1]
if redis.call('ZREM', rsv, member) == 0 then return 0 end
redis.call('ZREM', log, member)
redis.call('HDEL', costs, member)
return 1
