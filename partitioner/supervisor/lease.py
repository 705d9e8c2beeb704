"""A lease in Redis: one holder at a time, renewed while it lives, free when it dies.

The supervisor of one host leads through it, and the breaker's mover of one worker moves
tasks. Taking, renewing and giving back are each one script, so a holder whose lease has
already passed to another can neither renew nor delete the new holder's key.
"""

from __future__ import annotations

import redis

# Renew the lease if this holder has it, else take it if it is free. 1: held.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Write KEYS[2] only while this holder has the lease: a leader that lost it mid-step
# cannot overwrite what the next leader wrote.
_WRITE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """The lease at `key` as seen by `holder`, lasting `ttl_ms` from each `hold()`."""

    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.holder = holder
        self.ttl_ms = ttl_ms
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)
        self._write = client.register_script(_WRITE)

    def hold(self) -> bool:
        """Take or renew the lease; True while this holder has it. Raises `RedisError`."""
        return bool(self._hold(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def release(self) -> None:
        """Give the lease back at once, if this holder still has it."""
        self._release(keys=[self.key], args=[self.holder])

    def write_if_held(self, key: str, value: str) -> bool:
        """Set `key` to `value` if this holder still has the lease; False if not."""
        return bool(self._write(keys=[self.key, key], args=[self.holder, value]))
