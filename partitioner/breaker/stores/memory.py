"""A breaker store in this process's memory: the pure state machine behind a lock.

For tests and for a single process; it shares nothing between processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from partitioner.breaker.machine import Breaker, Outcome, Policy, State, Transition
from partitioner.breaker.store import Snapshot


def _wall_ms() -> int:
    return int(time.time() * 1000)


class MemoryStore:
    """Breakers in a dict; `clock` returns milliseconds and may be replaced in tests."""

    def __init__(self, clock: Callable[[], int] = _wall_ms) -> None:
        self.clock = clock
        self.breakers: dict[str, Breaker] = {}
        self._lock = threading.Lock()

    def record(self, partition: str, policy: Policy, outcome: Outcome) -> Snapshot:
        with self._lock:
            now_ms = self.clock()
            breaker, moved = self._get(partition).record(policy, outcome, now_ms)
            return self._put(partition, breaker, policy, now_ms, moved)

    def claim(self, partition: str, policy: Policy) -> tuple[Snapshot, bool]:
        with self._lock:
            now_ms = self.clock()
            breaker, granted, moved = self._get(partition).claim(policy, now_ms)
            return self._put(partition, breaker, policy, now_ms, moved), granted

    def set(self, partition: str, state: State, reason: str, keep_window: bool = False) -> Snapshot:
        with self._lock:
            now_ms = self.clock()
            breaker, moved = self._get(partition).set(state, reason, keep_window)
            return self._put(partition, breaker, Policy(), now_ms, moved)

    def snapshot(self, partition: str, policy: Policy) -> Snapshot:
        with self._lock:
            now_ms = self.clock()
            breaker, moved = self._get(partition).advance(policy, now_ms)
            return self._put(partition, breaker, policy, now_ms, moved)

    def _get(self, partition: str) -> Breaker:
        return self.breakers.get(partition, Breaker())

    def _put(
        self,
        partition: str,
        breaker: Breaker,
        policy: Policy,
        now_ms: int,
        moved: Transition | None,
    ) -> Snapshot:
        self.breakers[partition] = breaker
        return Snapshot(
            state=breaker.state,
            until_ms=breaker.until_ms,
            now_ms=now_ms,
            counts=breaker.window.counts(policy, now_ms),
            reopens=breaker.reopens,
            permits=breaker.permits,
            probe_ok=breaker.probe_ok,
            period=breaker.period,
            transitions=(moved,) if moved else (),
        )
