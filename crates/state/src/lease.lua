-- Takes, renews, resizes or gives back one holder's lease of an upstream's permits.
-- Called by RedisState::lease_permits (redis_state.rs); LiveState::lease_permits (lib.rs)
-- states the contract and settle_lease (lib.rs) is the same decision in Rust.
--
-- KEYS[1]  leases hash of the upstream: field = holder, value = "granted:want:expires_ms"
-- ARGV[1]  holder
-- ARGV[2]  want     (decimal integers from here on)
-- ARGV[3]  keep
-- ARGV[4]  cap
-- ARGV[5]  ttl in milliseconds
--
-- Returns {granted, share, holders}.
--
-- Time is Redis' own (TIME), so executors' clocks never matter. Redis runs the script without
-- interleaving any other command: the sum of the grants it sees is the sum that exists.

-- Redis < 7 needs this before a write that follows TIME; later versions replicate effects
-- anyway.
if redis.replicate_commands then
  redis.replicate_commands()
end

local key, holder = KEYS[1], ARGV[1]
local want, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
if want > cap then
  want = cap
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- Drop the leases that ran out (and anything unreadable); sum the others.
local taken, others = 0, 0
local wants = {}
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local who = fields[i]
  local granted, wanted, expires = string.match(fields[i + 1], '^(%d+):(%d+):(%d+)$')
  if granted == nil or tonumber(expires) <= now then
    redis.call('HDEL', key, who)
  elseif who ~= holder then
    taken = taken + tonumber(granted)
    wants[#wants + 1] = tonumber(wanted)
    others = others + 1
  end
end

-- Max-min fair share of cap over every live want, this one included (rounded up).
wants[#wants + 1] = want
table.sort(wants)
local share, left, n = cap, cap, #wants
for _, wanted in ipairs(wants) do
  local level = math.ceil(left / n)
  if wanted > level then
    share = level
    break
  end
  left = left - wanted
  n = n - 1
end

local room = cap - taken
if room < 0 then
  room = 0
end
local granted = math.max(math.min(want, share, room), keep)

local holders = others
if granted == 0 and want == 0 then
  redis.call('HDEL', key, holder)
else
  redis.call('HSET', key, holder, string.format('%d:%d:%d', granted, want, now + ttl))
  holders = holders + 1
end
-- The hash outlives its longest lease, and no more: a deployment gone leaves nothing.
if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < ttl then
  redis.call('PEXPIRE', key, ttl)
end

return {granted, share, holders}
