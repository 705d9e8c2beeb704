-- Claim one half-open probe permit. Returns the snapshot and, last, 1 if granted.
local b = load()
advance(b)
local granted = 0
if b.state == 'half_open' and b.permits < P.half_open_probes then
  b.permits = b.permits + 1
  granted = 1
end
local result = save(b)
result[#result + 1] = granted
return result
