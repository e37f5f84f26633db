-- KEYS[1] record; ARGV[1] claim token, ARGV[2] ttl (ms)
-- Returns {0, ''} claimed, {1, ''} in progress, {2, outcome} done.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' then
  return {2, redis.call('HGET', KEYS[1], 'outcome')}
end
if state == 'claimed' then
  return {1, ''}
end
redis.call('HSET', KEYS[1], 'state', 'claimed', 'token', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {0, ''}
