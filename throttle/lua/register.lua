--[[ register: note an enqueued call, to be re-published if the broker loses it.

KEYS[1]  calls      ZSET  undecided calls, score = when to count them lost (ms)
KEYS[2]  calls msg  HASH  task id -> the call's message
KEYS[3]  decided    ZSET  (optional: a registration sent after the publish, in the
                      background) calls the gate decided before their registration
                      arrived, score = until when (ms) to drop it (acquire.lua)
ARGV[1]  member     the task id
ARGV[2]  check_ms   when to count the call lost if the gate has not decided it
ARGV[3]  message    what re-publishes it
ARGV[4]  ttl_ms     how long the registry must live from now

Returns 1, or 0 when the call was already decided (nothing is registered: the reaper
would publish a decided call again). The TTL is only raised, and then with as much again
to spare, so most calls just read it.
]]

if KEYS[3] then
  local until_ms = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if until_ms then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    if tonumber(until_ms) > now then return 0 end
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- expired: this one and others
  end
end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], 2 * ttl) end
end
return 1
