--[[ claim: take the calls of a registry whose check time has come (probably lost).

KEYS[1]  calls      ZSET  undecided calls, score = when to count them lost (ms)
KEYS[2]  calls msg  HASH  task id -> the call's message
ARGV[1]  now_ms
ARGV[2]  retry_ms   when to look at a claimed call again, from now
ARGV[3]  limit      the most calls to claim

Returns a flat list: id, message, id, message, ... Each claimed call's check time moves
retry_ms ahead, so concurrent reapers never claim the same call twice in that time; the
gate removes a call from the registry once it is admitted or refused.
]]

local now, retry = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + retry, member)
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[2], member) or ''
end
return out
