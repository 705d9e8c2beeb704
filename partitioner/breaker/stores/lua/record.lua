-- Count one task's outcome and make the transition it causes.
-- ARGV[5] failed (0/1), ARGV[6] slow (0/1), ARGV[7] the half-open period of a probe (0: none)
local failed, slow, probe = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local b = load()
advance(b)

if b.state == 'closed' or b.state == 'metrics_only' then
  window_add(failed, slow)
  if b.state == 'closed' then
    local calls, failures, slows = counts()
    if calls >= P.min_calls then
      local failure_rate, slow_rate = failures / calls, slows / calls
      if failure_rate >= P.failure_rate then
        open(b, 0, string.format('failure rate %.0f%% (%d of %d calls) >= %.0f%%',
          failure_rate * 100, failures, calls, P.failure_rate * 100))
      elseif P.slow_call_ms >= 0 and slow_rate >= P.slow_call_rate then
        open(b, 0, string.format('slow-call rate %.0f%% (%d of %d calls over %g s) >= %.0f%%',
          slow_rate * 100, slows, calls, P.slow_call_ms / 1000, P.slow_call_rate * 100))
      end
    end
  end
elseif b.state == 'half_open' and probe == b.period then
  if failed == 1 or slow == 1 then
    open(b, b.reopens + 1, string.format('probe %s (%d of %d succeeded)',
      failed == 1 and 'failed' or 'was slow', b.probe_ok, P.half_open_probes))
  else
    b.probe_ok = b.probe_ok + 1
    if b.probe_ok >= P.half_open_probes then
      emit(b, 'closed', string.format('%d of %d probes succeeded', b.probe_ok,
        P.half_open_probes))
      reset(b, 'closed')
    end
  end
end
return save(b)
