-- The breaker now, after moving open to half_open if its period is over. Writes only when
-- that changed something, so that polling it costs no write.
local b = load()
advance(b)
if dirty or #events > 0 then
  return save(b)
end
return result_of(b)
