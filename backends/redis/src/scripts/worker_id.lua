-- Worker-id leases: one key per id, '<prefix><id>' holding the owner token,
-- and one hash '<prefix>last' keeping, per id, the last timestamp (Unix ms,
-- on the holder's clock) its latest holder may have put in an id.
-- KEYS[1] any key with the worker-id hash tag (routes the script)
-- ARGV[1] operation, ARGV[2] key prefix, then:
--   allocate  max id, token, ttl ms, now ms -> {lowest free id, previous holder's last ms}, or {-1, 0}
--   renew     id, token, ttl ms, now ms     -> 1 renewed, 0 lost
--   release   id, token, last ms            -> 1 released, 0 not held (last: the release time, or the bound the holder inherited if later)
--   forget    max id, token, now ms         -> releases whichever id holds token (an allocation whose answer was lost; the id's record is only raised)
local op, prefix = ARGV[1], ARGV[2]
local last = prefix .. 'last'
if op == 'allocate' then
  local max, token, ttl, now = tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
  for id = 0, max do
    if redis.call('SET', prefix .. id, token, 'NX', 'PX', ttl) then
      local before = tonumber(redis.call('HGET', last, id) or '0')
      redis.call('HSET', last, id, math.max(before, now + tonumber(ttl)))
      return {id, before}
    end
  end
  return {-1, 0}
end
if op == 'forget' then
  for id = 0, tonumber(ARGV[3]) do
    if redis.call('GET', prefix .. id) == ARGV[4] then
      redis.call('DEL', prefix .. id)
      -- The bound the allocation inherited is not known here: keep it.
      local before = tonumber(redis.call('HGET', last, id) or '0')
      redis.call('HSET', last, id, math.max(before, tonumber(ARGV[5])))
      return 1
    end
  end
  return 0
end
local id, token = ARGV[3], ARGV[4]
if redis.call('GET', prefix .. id) ~= token then
  return 0
end
if op == 'renew' then
  redis.call('PEXPIRE', prefix .. id, ARGV[5])
  local before = tonumber(redis.call('HGET', last, id) or '0')
  redis.call('HSET', last, id, math.max(before, tonumber(ARGV[6]) + tonumber(ARGV[5])))
else
  redis.call('DEL', prefix .. id)
  -- The holder stops issuing ids now.
  redis.call('HSET', last, id, ARGV[5])
end
return 1
