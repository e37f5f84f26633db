-- GCRA rate-limit decision on the server's clock, in one round trip.
-- KEYS[1]  the bucket (holds the theoretical arrival time, microseconds)
-- ARGV[1]  emission interval (us)   ARGV[2]  tolerance = emission * burst (us)
-- ARGV[3]  n (units asked)          ARGV[4]  burst
-- Returns {allowed, remaining, retry_after_us, reset_after_us, reason}
-- reason: 0 allowed, 1 rate exceeded, 2 n above burst.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local em = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local function remaining(at)
  local r = math.floor((now + tol - at) / em)
  if r < 0 then r = 0 end
  if r > burst then r = burst end
  return r
end
if n > burst then
  return {0, remaining(tat), -1, tat - now, 2}
end
local new_tat = tat + em * n
local allow_at = new_tat - tol
if now < allow_at then
  return {0, remaining(tat), allow_at - now, tat - now, 1}
end
-- The bucket is full again at new_tat: let the key expire then.
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, remaining(new_tat), 0, new_tat - now, 0}
