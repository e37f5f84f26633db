-- Service registry operations, atomically, on the server's clock.
-- KEYS[1] instances (hash sid -> instance JSON)   KEYS[2] leases (hash sid -> token)
-- KEYS[3] expiries (zset sid -> ms)               KEYS[4] names (zset of sid, lexicographic)
-- KEYS[5] revision counter                        KEYS[6] change stream ('<rev>-1': t, i)
-- ARGV[1] operation, ARGV[2] stream max length, then per operation:
--   put        sid, instance JSON, lease, ttl ms   -> 1
--   keepalive  sid, lease, ttl ms                  -> 1 kept, 0 lease lost
--   update     sid, lease, instance JSON           -> 1 updated, 0 lease lost
--   replace    sid, instance JSON                  -> 1 replaced (any lease, recorded ttl kept), 0 not registered
--   remove     sid, lease ('' = whoever holds it)  -> 1 removed, 0 not there
--   reap                                           -> the revision, after removing expired instances
--   list       sid prefix ('' = all)               -> {revision, json1, json2, ...} of live instances
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local maxlen = ARGV[2]

local function event(kind, json)
  local rev = redis.call('INCR', KEYS[5])
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', maxlen, rev .. '-1', 't', kind, 'i', json)
end

local function live(sid)
  local exp = redis.call('ZSCORE', KEYS[3], sid)
  return exp and tonumber(exp) > now
end

local function remove(sid)
  local old = redis.call('HGET', KEYS[1], sid)
  redis.call('HDEL', KEYS[1], sid)
  redis.call('HDEL', KEYS[2], sid)
  redis.call('ZREM', KEYS[3], sid)
  redis.call('ZREM', KEYS[4], sid)
  if old then event('d', old) end
end

-- Expired instances go first, so that every operation sees live ones only.
local function reap()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 200)
  for _, sid in ipairs(expired) do remove(sid) end
  return #expired
end

if op == 'reap' then
  reap()
  return tonumber(redis.call('GET', KEYS[5]) or '0')
end

if op == 'put' then
  local sid, json, lease, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
  reap()
  local old = redis.call('HGET', KEYS[1], sid)
  redis.call('HSET', KEYS[1], sid, json)
  redis.call('HSET', KEYS[2], sid, lease)
  redis.call('ZADD', KEYS[3], now + ttl, sid)
  redis.call('ZADD', KEYS[4], 0, sid)
  if not old then
    event('a', json)
  elseif old ~= json then
    event('u', json)
  end
  return 1
end

if op == 'keepalive' then
  local sid, lease, ttl = ARGV[3], ARGV[4], tonumber(ARGV[5])
  if redis.call('HGET', KEYS[2], sid) == lease and live(sid) then
    redis.call('ZADD', KEYS[3], now + ttl, sid)
    return 1
  end
  return 0
end

-- update: the registration of `lease` only; replace: whoever holds it,
-- keeping the TTL recorded with it.
if op == 'update' or op == 'replace' then
  local sid, json
  if op == 'update' then
    sid, json = ARGV[3], ARGV[5]
    if redis.call('HGET', KEYS[2], sid) ~= ARGV[4] then return 0 end
  else
    sid, json = ARGV[3], ARGV[4]
  end
  if not live(sid) then return 0 end
  local old = redis.call('HGET', KEYS[1], sid)
  if op == 'replace' and old then
    local recorded = cjson.decode(old).ttl
    local new = cjson.decode(json)
    if new.ttl ~= recorded then
      new.ttl = recorded
      json = cjson.encode(new)
    end
  end
  if old ~= json then
    redis.call('HSET', KEYS[1], sid, json)
    event('u', json)
  end
  return 1
end

if op == 'remove' then
  local sid, lease = ARGV[3], ARGV[4]
  local holder = redis.call('HGET', KEYS[2], sid)
  if not holder or (lease ~= '' and holder ~= lease) then
    return 0
  end
  remove(sid)
  return 1
end

if op == 'list' then
  reap()
  local prefix = ARGV[3]
  local sids
  if prefix == '' then
    sids = redis.call('ZRANGEBYLEX', KEYS[4], '-', '+')
  else
    sids = redis.call('ZRANGEBYLEX', KEYS[4], '[' .. prefix, '[' .. prefix .. '\255')
  end
  local out = {tonumber(redis.call('GET', KEYS[5]) or '0')}
  for _, sid in ipairs(sids) do
    if live(sid) then
      table.insert(out, redis.call('HGET', KEYS[1], sid))
    end
  end
  return out
end

return redis.error_reply('unknown registry operation ' .. tostring(op))
