-- Worker-id leases: one key per id, '<prefix><id>' holding the owner token.
-- KEYS[1] any key with the worker-id hash tag (routes the script)
-- ARGV[1] operation, ARGV[2] key prefix, then:
--   allocate  max id, token, ttl ms   -> the lowest free id, or -1
--   renew     id, token, ttl ms       -> 1 renewed, 0 lost
--   release   id, token               -> 1 released, 0 not held
local op, prefix = ARGV[1], ARGV[2]
if op == 'allocate' then
  local max, token, ttl = tonumber(ARGV[3]), ARGV[4], ARGV[5]
  for id = 0, max do
    if redis.call('SET', prefix .. id, token, 'NX', 'PX', ttl) then
      return id
    end
  end
  return -1
end
local key, token = prefix .. ARGV[3], ARGV[4]
if redis.call('GET', key) ~= token then
  return 0
end
if op == 'renew' then
  redis.call('PEXPIRE', key, ARGV[5])
else
  redis.call('DEL', key)
end
return 1
