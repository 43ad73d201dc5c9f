-- Records finished lines of one batch, each counted at most once ever.
-- Called by RedisState::record (redis_state.rs), which documents the key layout.
--
-- KEYS[1]   done bitmap: bit n set = line n of the batch has been counted
-- KEYS[2]   counts hash: completed, failed and the five usage fields
-- KEYS[3]   cancel flag: not written here, only its TTL is refreshed
-- ARGV[1]   TTL in milliseconds, given to every key of the batch
-- ARGV[2..] seven values per line: line, succeeded (1 or 0), input_tokens, cached_tokens,
--           output_tokens, reasoning_tokens, total_tokens; decimal integers
--
-- Returns the number of lines newly counted.
--
-- Exactly once: SETBIT returns the bit's previous value, so a line is counted only by the
-- call that flips its bit from 0 to 1 (a line repeated in ARGV, or already set by an earlier
-- call, is skipped: the first outcome recorded wins). Redis runs a script without
-- interleaving any other command, so the bits and the counters they guard change together
-- and concurrent calls cannot both count a line.
--
-- Redis does not roll back a script that fails halfway, so everything that could fail is
-- checked by the caller before the call: lines are within 1..2^32-1 (SETBIT's range) and
-- each usage field sums to at most 2^53 over the call, below which Lua's numbers (doubles)
-- add integers exactly. The sums are passed to HINCRBY formatted with %d, never as Lua
-- numbers, which Redis would print in exponent notation once large.

local done, counts, cancelled = KEYS[1], KEYS[2], KEYS[3]
local ttl = ARGV[1]

local completed, failed = 0, 0
local input, cached, output, reasoning, total = 0, 0, 0, 0, 0

for i = 2, #ARGV, 7 do
  if redis.call('SETBIT', done, ARGV[i], 1) == 0 then
    if ARGV[i + 1] == '1' then
      completed = completed + 1
    else
      failed = failed + 1
    end
    -- Arithmetic converts the decimal strings itself, at about half the cost of tonumber().
    input = input + ARGV[i + 2]
    cached = cached + ARGV[i + 3]
    output = output + ARGV[i + 4]
    reasoning = reasoning + ARGV[i + 5]
    total = total + ARGV[i + 6]
  end
end

local function add(field, n)
  if n > 0 then
    redis.call('HINCRBY', counts, field, string.format('%d', n))
  end
end

add('completed', completed)
add('failed', failed)
add('input_tokens', input)
add('cached_tokens', cached)
add('output_tokens', output)
add('reasoning_tokens', reasoning)
add('total_tokens', total)

-- The done bitmap exists as soon as one line was ever recorded; the counts hash and the cancel
-- flag may not exist yet, and PEXPIRE on a missing key does nothing.
redis.call('PEXPIRE', done, ttl)
redis.call('PEXPIRE', counts, ttl)
redis.call('PEXPIRE', cancelled, ttl)

return completed + failed
