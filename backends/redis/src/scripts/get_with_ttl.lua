-- The value and the TTL of every key in KEYS, read together (no write can
-- come between a key's two reads): value1, pttl1, value2, pttl2, ...
-- A missing key answers nil and -2, a key without a TTL -1.
local out = {}
for i, key in ipairs(KEYS) do
  out[2 * i - 1] = redis.call('GET', key)
  out[2 * i] = redis.call('PTTL', key)
end
return out
