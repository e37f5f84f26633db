-- Sets or deletes a config key, appending the change to the change stream
-- under the new revision (stream id '<revision>-1').
-- KEYS[1] revision counter, KEYS[2] values hash (v:<key>, r:<key>),
-- KEYS[3] key index (zset), KEYS[4] change stream
-- ARGV[1] key, ARGV[2] 'p' (put) or 'd' (delete), ARGV[3] value,
-- ARGV[4] expected version ('' = any), ARGV[5] stream max length
-- Returns {1, revision}, {0, 0} for a delete of a missing key,
-- {-1, current version} on a version mismatch.
--
-- The revision is the larger of the previous one + 1 and the server's
-- clock in microseconds since 1970: strictly increasing, and after a
-- restart from an older snapshot (or a failover to a lagging replica)
-- still above every revision handed out before, as long as the server's
-- clock did not step back across the restore. (About 1.8e15: exact in a
-- Lua number, below 2^53; always written with '%d', never as '1.8e+15'.)
-- Each stream entry also names the revision before it ('pr'), so that a
-- watch can tell a continuous history from one that lost or dropped
-- entries between its cursor and the next entry.
local vfield = 'v:' .. ARGV[1]
local rfield = 'r:' .. ARGV[1]
local current = tonumber(redis.call('HGET', KEYS[2], rfield) or '0')
if ARGV[4] ~= '' and current ~= tonumber(ARGV[4]) then
  return {-1, current}
end
if ARGV[2] == 'd' and current == 0 then
  return {0, 0}
end
local prev = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = redis.call('TIME')
local rev = math.max(prev + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
local srev = string.format('%d', rev)
local sprev = string.format('%d', prev)
redis.call('SET', KEYS[1], srev)
if ARGV[2] == 'p' then
  redis.call('HSET', KEYS[2], vfield, ARGV[3], rfield, srev)
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], srev .. '-1', 'k', ARGV[1], 't', 'p', 'v', ARGV[3], 'pr', sprev)
else
  redis.call('HDEL', KEYS[2], vfield, rfield)
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], srev .. '-1', 'k', ARGV[1], 't', 'd', 'pr', sprev)
end
return {1, rev}
