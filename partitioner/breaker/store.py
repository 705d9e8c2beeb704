"""The breaker store contract: shared, atomic breaker state, one record per partition.

Every operation is one atomic step on the store's own clock, so that processes on many
hosts agree on when an open period ends and on how many probes were admitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from partitioner.breaker.machine import Counts, Outcome, Policy, State, Transition


@dataclass(frozen=True)
class Snapshot:
    """A breaker as the store last saw it, and the store's clock at that moment."""

    state: State
    until_ms: int
    now_ms: int
    counts: Counts
    reopens: int = 0
    permits: int = 0
    probe_ok: int = 0
    period: int = 0  # id of the half-open period; a probe's outcome must carry it
    transitions: tuple[Transition, ...] = ()

    @property
    def open_left_s(self) -> float:
        """Seconds until the open period ends (0 when not open)."""
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, (self.until_ms - self.now_ms) / 1000)


class BreakerStore(Protocol):
    """Where breakers live. Implementations: `stores.memory` and `stores.redis`."""

    def record(self, partition: str, policy: Policy, outcome: Outcome) -> Snapshot:
        """Count a task's outcome and make the transition it causes, in one step."""
        ...

    def claim(self, partition: str, policy: Policy) -> tuple[Snapshot, bool]:
        """Claim a half-open probe permit; True only for `half_open_probes` claims.

        The snapshot's `period` is what the probe's outcome must carry."""
        ...

    def set(self, partition: str, state: State, reason: str, keep_window: bool = False) -> Snapshot:
        """Put a breaker in a state by hand (closed, forced_open, disabled, metrics_only);
        its window is cleared unless `keep_window`."""
        ...

    def snapshot(self, partition: str, policy: Policy) -> Snapshot:
        """The breaker now, after moving open to half_open if its period is over."""
        ...
