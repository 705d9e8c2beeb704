-- Put the breaker in a state by hand. ARGV[5] state, ARGV[6] reason
local b = load()
if b.state ~= ARGV[5] then
  emit(b, ARGV[5], ARGV[6])
end
reset(b, ARGV[5])
return save(b)
