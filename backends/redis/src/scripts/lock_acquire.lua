-- KEYS[1] lock hash   KEYS[2] fencing counter (same hash tag)
-- ARGV[1] owner token ARGV[2] ttl (ms)
-- Returns {1, fencing token} when acquired, {0, remaining ttl ms} when held.
-- A lock already held by ARGV[1] (an earlier attempt of the same caller
-- whose answer was lost) is the caller's: its TTL starts again from now and
-- its token is returned.
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('HGET', KEYS[1], 'fence'))}
end
if owner or redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1])}
end
local t = redis.call('TIME')
-- The fencing token: the larger of the last token + 1 and the server's
-- clock in microseconds since 1970. Strictly increasing; after a restart
-- from an older snapshot or a failover to a lagging replica (the counter
-- went back) still above every token issued before, as long as the
-- server's clock did not step back across the restore. About 1.8e15: exact
-- in a Lua number (below 2^53), stored with '%d' (never '1.8e+15').
local fence = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1,
  tonumber(t[1]) * 1000000 + tonumber(t[2]))
local sfence = string.format('%d', fence)
redis.call('SET', KEYS[2], sfence)
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'fence', sfence, 'at', at)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, fence}
