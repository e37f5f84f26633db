-- KEYS[1] record; ARGV[1] claim token, ARGV[2] 'complete' or 'abandon',
-- ARGV[3] outcome, ARGV[4] ttl (ms). Only the claim's owner may finish it.
if redis.call('HGET', KEYS[1], 'state') ~= 'claimed' or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'abandon' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', ARGV[3])
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
