"""The producer gate: at publish time, send a task on, make it a probe, park it or reject it.

It answers from the process's `BreakerView`, so a publish to a closed partition costs no
Redis round trip; only a half-open breaker asks the store, to claim a probe permit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from partitioner.breaker.board import Breakers
from partitioner.breaker.machine import State
from partitioner.breaker.view import BreakerView
from partitioner.errors import PartitionOpen, StoreUnavailable
from partitioner.topology import Partition

# Message header that marks a probe task; the worker reports its outcome as a probe's.
PROBE_HEADER = "partitioner_probe"
# What a rejected task is told while the breaker is half-open or the store is away.
RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class Admission:
    """Where the gate sends a task: its queue, and the half-open period of a probe."""

    queue: str
    probe: int = 0


class ProducerGate:
    """Decides, per publish, what a partition's breaker lets through."""

    def __init__(self, breakers: Breakers, view: BreakerView) -> None:
        self.breakers = breakers
        self.view = view

    def admit(self, partition: Partition, park: Callable[[], bool] = lambda: False) -> Admission:
        """The admission of one task of `partition`; raises `PartitionOpen` to reject it.

        A task that would be rejected is parked instead when `park()` says so; it is asked
        only then, to keep the closed path cheap.
        """
        if not partition.breaker.enabled:
            return Admission(partition.queue)
        seen = self.view.get(partition.name)
        if seen is None:
            return self._store_away(partition, park)

        state = seen.now()
        if not state.halts:
            return Admission(partition.queue)
        if state is State.HALF_OPEN:
            try:
                period = self.breakers.claim(partition)
                if period:
                    return Admission(partition.probe_queue, probe=period)
            except StoreUnavailable:
                return self._store_away(partition, park)
        retry_after_s = seen.retry_after_s if state is State.OPEN else RETRY_AFTER_S
        return self._halt(partition, park, retry_after_s, str(state))

    def _store_away(self, partition: Partition, park: Callable[[], bool]) -> Admission:
        if partition.breaker.on_store_error == "allow":
            return Admission(partition.queue)
        why = "unknown: breaker store unreachable"
        return self._halt(partition, park, RETRY_AFTER_S, why)

    def _halt(
        self, partition: Partition, park: Callable[[], bool], retry_after_s: float, state: str
    ) -> Admission:
        if partition.breaker.on_open == "park" or park():
            return Admission(partition.parking_queue)
        raise PartitionOpen(partition.name, state, retry_after_s)
