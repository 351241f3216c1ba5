--[[ register: note an enqueued call, to be re-published if the broker loses it.

KEYS[1]  calls      ZSET  undecided calls, score = when to count them lost (ms)
KEYS[2]  calls msg  HASH  task id -> the call's message
ARGV[1]  member     the task id
ARGV[2]  check_ms   when to count the call lost if the gate has not decided it
ARGV[3]  message    what re-publishes it
ARGV[4]  ttl_ms     how long the registry must live from now

The TTL is only raised, and then with as much again to spare, so most calls just read it.
]]

local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, 2 * ttl) end
end
return 1
