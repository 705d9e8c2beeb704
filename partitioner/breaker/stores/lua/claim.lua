-- Claim one half-open probe permit. Returns the snapshot and, last, 1 if granted. A refused
-- claim writes nothing, unless the deadline of lost probes passed.
local b = load()
advance(b)
local granted = 0
if b.state == 'half_open' and b.permits < P.half_open_probes then
  b.permits = b.permits + 1
  granted = 1
end
local result
if granted == 1 or dirty or #events > 0 then
  result = save(b)
else
  result = result_of(b)
end
result[#result + 1] = granted
return result
