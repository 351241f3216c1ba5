--[[ waiting: one tool's sets of calls held with an ETA (throttle/monitor/waiting.py), as
one worker process's flush leaves them, in an order that does not depend on which process
flushes first.

KEYS     the tool's waiting set of each delay reason (DELAY_REASONS' order), then its
         `decided` set: member '<task id>|<n>' for the call's decision after its n-th delay,
         score = when it was noted (ms)
ARGV[1]  now_ms; ARGV[2] the bound (ms) below which a waiting entry is stale; ARGV[3] the
         sets' TTL (s); ARGV[4] the bound (ms) below which a noted decision goes
then     per call, five arguments: task id; n, the delays before this decision that clear
         it (0: none; -1: revoked, cleared without a note); the reason's index (1-based, 0
         for none) and ETA (ms) of its delay; that delay's number

A delay's entry is not written once its next decision was noted (it was decided, and its
flush came first, in another process): a call waits from its delay until its next
decision, whichever process flushes first.
]]

local nreasons = #KEYS - 1
local decided = KEYS[#KEYS]
local now = ARGV[1]
local touched = {}
for i = 5, #ARGV, 5 do
  local id, cleared, reason = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if cleared ~= 0 then
    for r = 1, nreasons do redis.call('ZREM', KEYS[r], id) end
    if cleared > 0 then redis.call('ZADD', decided, now, id .. '|' .. ARGV[i + 1]) end
  end
  if reason > 0 and not redis.call('ZSCORE', decided, id .. '|' .. ARGV[i + 4]) then
    redis.call('ZADD', KEYS[reason], ARGV[i + 3], id)
    touched[reason] = true
  end
end
for r in pairs(touched) do
  redis.call('ZREMRANGEBYSCORE', KEYS[r], '-inf', '(' .. ARGV[2])
  redis.call('EXPIRE', KEYS[r], ARGV[3])
end
redis.call('ZREMRANGEBYSCORE', decided, '-inf', '(' .. ARGV[4])
if redis.call('ZCARD', decided) > 0 then redis.call('EXPIRE', decided, ARGV[3]) end
return 0
