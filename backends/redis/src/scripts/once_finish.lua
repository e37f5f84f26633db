-- KEYS[1] record; ARGV[1] claim token, ARGV[2] 'complete', 'abandon' or
-- 'renew', ARGV[3] outcome, ARGV[4] ttl (ms). Only the claim's owner may
-- act on it. The token stays on a completed record, so that completing
-- again (a retry after a lost answer) and renewing a claim its owner just
-- completed are recognised as the owner's.
local state = redis.call('HGET', KEYS[1], 'state')
local mine = redis.call('HGET', KEYS[1], 'token') == ARGV[1]
if state == 'done' and mine and ARGV[2] ~= 'abandon' then
  return 1
end
if state ~= 'claimed' or not mine then
  return 0
end
if ARGV[2] == 'abandon' then
  redis.call('DEL', KEYS[1])
  return 1
end
if ARGV[2] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
