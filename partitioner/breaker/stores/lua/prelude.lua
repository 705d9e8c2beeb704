-- Shared by every breaker script. The rules are those of partitioner/breaker/machine.py;
-- the tests run both on the same sequences of calls.
--
-- KEYS[1] state hash, KEYS[2] count window (list), KEYS[3] time window (hash)
-- ARGV[1] policy (JSON), ARGV[2] channel, ARGV[3] partition, ARGV[4] ttl_ms; op args follow.
local state_key, count_key, time_key = KEYS[1], KEYS[2], KEYS[3]
local P = cjson.decode(ARGV[1])
local channel, partition, ttl_ms = ARGV[2], ARGV[3], tonumber(ARGV[4])
local BUCKETS = 10
local PROBE_DEADLINE_MIN_MS = 10000
local MANUAL = {forced_open = true, disabled = true, metrics_only = true}

-- The server's clock: every process on every host sees the same time.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local events = {}
local dirty = false  -- set when a step changed the breaker without a transition

local function load()
  local v = redis.call('HMGET', state_key, 'state', 'until', 'reopens', 'permits', 'probe_ok',
    'period')
  return {
    state = v[1] or 'closed',
    until_ms = tonumber(v[2]) or 0,
    reopens = tonumber(v[3]) or 0,
    permits = tonumber(v[4]) or 0,
    probe_ok = tonumber(v[5]) or 0,
    period = tonumber(v[6]) or 0,
  }
end

local function emit(b, new, reason)
  table.insert(events, {
    partition = partition, old = b.state, new = new, reason = reason,
    until_ms = (new == 'open') and b.until_ms or 0, at_ms = now,
  })
end

local function open_for(reopens)
  return math.min(P.open_max_ms, math.floor(P.open_ms * P.open_backoff ^ reopens))
end

local function probe_deadline(reopens)
  return math.max(open_for(reopens), PROBE_DEADLINE_MIN_MS)
end

local function bucket_ms()
  return math.max(1, math.floor(P.window_ms / BUCKETS))
end

local function clear_window()
  redis.call('DEL', count_key, time_key)
end

local function window_add(failed, slow)
  if P.window == 'count' then
    redis.call('LPUSH', count_key, failed + 2 * slow)
    redis.call('LTRIM', count_key, 0, P.window_calls - 1)
    redis.call('PEXPIRE', count_key, ttl_ms)
    return
  end
  local n = math.floor(now / bucket_ms())
  redis.call('HINCRBY', time_key, 'c:' .. n, 1)
  redis.call('HINCRBY', time_key, 'f:' .. n, failed)
  redis.call('HINCRBY', time_key, 's:' .. n, slow)
  local stale = {}
  for i = n - 2 * BUCKETS + 1, n - BUCKETS do
    stale[#stale + 1] = 'c:' .. i
    stale[#stale + 1] = 'f:' .. i
    stale[#stale + 1] = 's:' .. i
  end
  redis.call('HDEL', time_key, unpack(stale))
  redis.call('PEXPIRE', time_key, ttl_ms)
end

local function counts()
  local calls, failures, slow = 0, 0, 0
  if P.window == 'count' then
    for _, code in ipairs(redis.call('LRANGE', count_key, 0, P.window_calls - 1)) do
      code = tonumber(code)
      calls = calls + 1
      failures = failures + code % 2
      slow = slow + math.floor(code / 2)
    end
    return calls, failures, slow
  end
  local n = math.floor(now / bucket_ms())
  local fields = {}
  for i = n - BUCKETS + 1, n do
    fields[#fields + 1] = 'c:' .. i
    fields[#fields + 1] = 'f:' .. i
    fields[#fields + 1] = 's:' .. i
  end
  local v = redis.call('HMGET', time_key, unpack(fields))
  for i = 1, #v, 3 do
    calls = calls + (tonumber(v[i]) or 0)
    failures = failures + (tonumber(v[i + 1]) or 0)
    slow = slow + (tonumber(v[i + 2]) or 0)
  end
  return calls, failures, slow
end

local function reset(b, state)
  b.state, b.until_ms, b.reopens, b.permits, b.probe_ok, b.period = state, 0, 0, 0, 0, 0
  clear_window()
end

local function advance(b)
  if b.state == 'open' and now >= b.until_ms then
    emit(b, 'half_open', string.format('open for %g s', open_for(b.reopens) / 1000))
    b.state, b.permits, b.probe_ok = 'half_open', 0, 0
    b.until_ms, b.period = now + probe_deadline(b.reopens), math.max(now, 1)
  elseif b.state == 'half_open' and now >= b.until_ms then
    -- Probes that did not report by the deadline are given up: grant their permits again.
    b.until_ms, b.permits, dirty = now + probe_deadline(b.reopens), b.probe_ok, true
  end
end

local function open(b, reopens, reason)
  b.until_ms = now + open_for(reopens)
  emit(b, 'open', reason)
  b.state, b.reopens, b.permits, b.probe_ok, b.period = 'open', reopens, 0, 0, 0
  clear_window()
end

local function result_of(b)
  local calls, failures, slow = counts()
  return {b.state, b.until_ms, now, calls, failures, slow, b.reopens, b.permits, b.probe_ok,
    b.period, cjson.encode(events)}
end

local function save(b)
  redis.call('HSET', state_key, 'state', b.state, 'until', b.until_ms,
    'reopens', b.reopens, 'permits', b.permits, 'probe_ok', b.probe_ok, 'period', b.period)
  if MANUAL[b.state] then
    redis.call('PERSIST', state_key)  -- a state set by hand lasts until changed by hand
  else
    redis.call('PEXPIRE', state_key, ttl_ms)
  end
  for _, event in ipairs(events) do
    redis.call('PUBLISH', channel, cjson.encode(event))
  end
  return result_of(b)
end
