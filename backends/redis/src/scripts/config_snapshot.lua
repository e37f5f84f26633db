-- The current state under a prefix (or of one key) with the revision, read
-- atomically, for watches that must resynchronise.
-- KEYS[1] revision counter, KEYS[2] values hash, KEYS[3] key index
-- ARGV[1] 'key' or 'prefix', ARGV[2] the key or prefix
-- Returns {revision, key1, value1, version1, key2, ...}
local out = {tonumber(redis.call('GET', KEYS[1]) or '0')}
local keys
if ARGV[1] == 'key' then
  keys = {ARGV[2]}
elseif ARGV[2] == '' then
  keys = redis.call('ZRANGEBYLEX', KEYS[3], '-', '+')
else
  keys = redis.call('ZRANGEBYLEX', KEYS[3], '[' .. ARGV[2], '[' .. ARGV[2] .. '\255')
end
for _, k in ipairs(keys) do
  local v = redis.call('HMGET', KEYS[2], 'v:' .. k, 'r:' .. k)
  if v[1] then
    table.insert(out, k)
    table.insert(out, v[1])
    table.insert(out, tonumber(v[2]))
  end
end
return out
