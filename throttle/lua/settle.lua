--[[ settle: correct a call's charge once its real cost is known (e.g. the LLM's usage).

KEYS[1]  log        ZSET  the tool's log (the member must be in it)
KEYS[2]  cost       HASH  member -> units of the tool's log
KEYS[3]  pool log   ZSET  (tools in a pool) the pool's log
KEYS[4]  pool cost  HASH  (tools in a pool) member -> units of the pool's log
ARGV[1]  member
ARGV[2]  units      the real cost (>= 0)

Returns 1 when the charge was corrected, 0 when the member has left the log (nothing to
correct: no window can see it any more). Later admissions see the corrected sums.
]]

local member, units = ARGV[1], tonumber(ARGV[2])

local function set(zset, hash)
  if not redis.call('ZSCORE', zset, member) then return 0 end
  local old = tonumber(redis.call('HGET', hash, member)) or 1
  if units == 1 then
    redis.call('HDEL', hash, member)
  else
    redis.call('HSET', hash, member, units)
    local ttl = redis.call('PTTL', zset)
    if ttl > 0 then redis.call('PEXPIRE', hash, ttl) end
  end
  -- The log's sum (units.lua), when the hash keeps one, follows.
  if units ~= old then weighing().add(hash, units - old, 0) end
  return 1
end

local done = set(KEYS[1], KEYS[2])
if KEYS[3] then set(KEYS[3], KEYS[4]) end
return done
