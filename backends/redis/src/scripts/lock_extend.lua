-- KEYS[1] lock hash; ARGV[1] owner token, ARGV[2] ttl (ms). Owner only.
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
