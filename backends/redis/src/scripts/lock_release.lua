-- KEYS[1] lock hash; ARGV[1] owner token, ARGV[2] release channel, ARGV[3] lock name
-- Deletes the lock only for its owner and announces the release.
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
