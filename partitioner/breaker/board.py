"""The breakers of one app's partitions: the shared store, each partition's policy, and the
log lines a person cares about (a transition, the store going away and coming back)."""

from __future__ import annotations

import logging
import threading
import time

from partitioner.breaker.machine import Outcome, State
from partitioner.breaker.store import BreakerStore, Snapshot
from partitioner.errors import StoreUnavailable
from partitioner.topology import Partition, Topology

log = logging.getLogger(__name__)


# While the store is away, outcomes are dropped for this long before the next try, so that
# a task does not wait for a store timeout every time.
RETRY_S = 1.0


class StoreHealth:
    """Whether the store answers; a change is logged once, not once per publish."""

    def __init__(self) -> None:
        self.reachable = True
        self.failed_at = 0.0
        self._lock = threading.Lock()

    @property
    def resting(self) -> bool:
        """True while the store was unreachable less than RETRY_S ago."""
        return not self.reachable and time.monotonic() - self.failed_at < RETRY_S

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failed_at = time.monotonic()
            if not self.reachable:
                return
            self.reachable = False
        what = exc if isinstance(exc, StoreUnavailable) else f"breaker store unreachable: {exc}"
        log.warning("%s; gates follow on_store_error until it returns", what)

    def answered(self) -> None:
        with self._lock:
            if self.reachable:
                return
            self.reachable = True
        log.info("breaker store reachable again; gates follow the breakers")


class Breakers:
    """Every partition's breaker, over one store shared by all processes and hosts."""

    def __init__(self, store: BreakerStore, topology: Topology) -> None:
        self.store = store
        self.topology = topology
        self.health = StoreHealth()

    @property
    def gated(self) -> list[Partition]:
        """The partitions whose breaker is enabled."""
        return [p for p in self.topology.partitions if p.breaker.enabled]

    def record(self, partition: Partition, outcome: Outcome) -> Snapshot | None:
        """Count an outcome; None when the store cannot be reached (the outcome is lost)."""
        if self.health.resting:
            return None
        try:
            snapshot = self.store.record(partition.name, partition.policy, outcome)
        except StoreUnavailable as exc:
            self.health.failed(exc)
            return None
        return self._seen(partition, snapshot)

    def claim(self, partition: Partition) -> int:
        """Claim a probe permit: the half-open period's id, or 0 if refused.

        Raises `StoreUnavailable`."""
        try:
            snapshot, granted = self.store.claim(partition.name, partition.policy)
        except StoreUnavailable as exc:
            self.health.failed(exc)
            raise
        self._seen(partition, snapshot)
        return snapshot.period if granted else 0

    def snapshot(self, partition: Partition) -> Snapshot:
        """The breaker now. Raises `StoreUnavailable`."""
        try:
            snapshot = self.store.snapshot(partition.name, partition.policy)
        except StoreUnavailable as exc:
            self.health.failed(exc)
            raise
        return self._seen(partition, snapshot)

    def set(
        self, partition: Partition, state: State, reason: str, keep_window: bool = False
    ) -> Snapshot:
        """Put a breaker in a state by hand. Raises `StoreUnavailable`."""
        snapshot = self.store.set(partition.name, state, reason, keep_window)
        return self._seen(partition, snapshot)

    def _seen(self, partition: Partition, snapshot: Snapshot) -> Snapshot:
        # Each transition comes back from exactly one atomic step in one process, so
        # logging it here logs it once across every process and host.
        self.health.answered()
        for moved in snapshot.transitions:
            log.info("%s: breaker %s -> %s: %s", partition.name, moved.old, moved.new, moved.reason)
        return snapshot
