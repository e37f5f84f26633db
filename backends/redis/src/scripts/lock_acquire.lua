-- KEYS[1] lock hash   KEYS[2] fencing counter (same hash tag)
-- ARGV[1] owner token ARGV[2] ttl (ms)
-- Returns {1, fencing token} when acquired, {0, remaining ttl ms} when held.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'fence', fence, 'at', at)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, fence}
