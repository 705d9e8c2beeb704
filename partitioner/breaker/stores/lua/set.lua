-- Put the breaker in a state by hand. ARGV[5] state, ARGV[6] reason, ARGV[7] keep window (0/1)
local b = load()
if b.state ~= ARGV[5] then
  emit(b, ARGV[5], ARGV[6])
end
local keep_window = ARGV[7] == '1'
b.state, b.until_ms, b.reopens, b.permits, b.probe_ok, b.period = ARGV[5], 0, 0, 0, 0, 0
if not keep_window then
  clear_window()
end
return save(b)
