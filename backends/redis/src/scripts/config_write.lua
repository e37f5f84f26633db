-- Sets or deletes a config key, appending the change to the change stream
-- under the new revision (stream id '<revision>-1').
-- KEYS[1] revision counter, KEYS[2] values hash (v:<key>, r:<key>),
-- KEYS[3] key index (zset), KEYS[4] change stream
-- ARGV[1] key, ARGV[2] 'p' (put) or 'd' (delete), ARGV[3] value,
-- ARGV[4] expected version ('' = any), ARGV[5] stream max length
-- Returns {1, revision}, {0, 0} for a delete of a missing key,
-- {-1, current version} on a version mismatch.
local vfield = 'v:' .. ARGV[1]
local rfield = 'r:' .. ARGV[1]
local current = tonumber(redis.call('HGET', KEYS[2], rfield) or '0')
if ARGV[4] ~= '' and current ~= tonumber(ARGV[4]) then
  return {-1, current}
end
if ARGV[2] == 'd' and current == 0 then
  return {0, 0}
end
local rev = redis.call('INCR', KEYS[1])
if ARGV[2] == 'p' then
  redis.call('HSET', KEYS[2], vfield, ARGV[3], rfield, rev)
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], rev .. '-1', 'k', ARGV[1], 't', 'p', 'v', ARGV[3])
else
  redis.call('HDEL', KEYS[2], vfield, rfield)
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], rev .. '-1', 'k', ARGV[1], 't', 'd')
end
return {1, rev}
