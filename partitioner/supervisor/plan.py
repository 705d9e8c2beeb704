"""The planner: target concurrency per partition from what was observed. Pure.

Rules, in order:

- every partition gets at least its `min`; a partition whose breaker halts it, and a
  partition with no backlog, get exactly their `min`, so their capacity goes elsewhere;
- a partition with backlog wants one process per task of it, up to its `max`;
- what the budget has left after every `min` is shared between the partitions that want
  more, in proportion to their backlog, no partition above what it wants;
- a busy partition is not shrunk within `cooldown_s` of its last change while the budget
  has room to keep it, so that a steady load never flaps.

Invariants, for any input with sum(min) <= budget: min <= target <= max for every
partition, and sum(target) <= budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    """One partition as the planner sees it."""

    name: str
    min: int
    max: int
    current: int
    backlog: int
    halted: bool = False  # its breaker is open, half-open or forced open

    @property
    def wants(self) -> int:
        """The concurrency it would use: its backlog, within its limits; min when idle."""
        if self.halted or self.backlog == 0:
            return self.min
        return max(self.min, min(self.max, self.backlog))


@dataclass(frozen=True)
class Plan:
    """Target concurrency by partition, and the reason for each change, in figures."""

    targets: dict[str, int]
    reasons: dict[str, str]


def plan(
    demands: Sequence[Demand],
    budget: int,
    since_change_s: Mapping[str, float] | None = None,
    cooldown_s: float = 10.0,
) -> Plan:
    """The targets for `demands` within `budget`.

    `since_change_s` gives, per partition, the seconds since its concurrency last changed
    (absent: long ago).
    """
    targets = {d.name: d.min for d in demands}
    spare = budget - sum(targets.values())
    if spare < 0:
        raise ValueError(f"the partitions' min add up to more than the budget {budget}")

    _share(demands, targets, spare)
    _hold_busy(demands, targets, budget, since_change_s or {}, cooldown_s)
    return Plan(targets, _reasons(demands, targets, budget))


def _share(demands: Sequence[Demand], targets: dict[str, int], spare: int) -> None:
    # Water-filling: each round gives every partition that still wants more a share of
    # what is left in proportion to its backlog (at least 1 to the largest backlogs),
    # until nothing is left or nobody wants more.
    while spare > 0:
        hungry = [d for d in demands if targets[d.name] < d.wants]
        if not hungry:
            return
        total = sum(d.backlog for d in hungry)
        shares = {d.name: spare * d.backlog // total for d in hungry}
        handed = sum(shares.values())
        by_backlog = sorted(hungry, key=lambda d: (-d.backlog, d.name))
        for d in by_backlog[: spare - handed]:
            shares[d.name] += 1  # the remainder, to the largest backlogs first
        for d in hungry:
            given = min(shares[d.name], d.wants - targets[d.name])
            targets[d.name] += given
            spare -= given


def _hold_busy(
    demands: Sequence[Demand],
    targets: dict[str, int],
    budget: int,
    since_change_s: Mapping[str, float],
    cooldown_s: float,
) -> None:
    room = budget - sum(targets.values())
    for d in sorted(demands, key=lambda d: d.name):
        shrink = d.current - targets[d.name]
        cooling = since_change_s.get(d.name, float("inf")) < cooldown_s
        if shrink > 0 and cooling and d.backlog > 0 and not d.halted and room > 0:
            kept = min(shrink, room, d.max - targets[d.name])
            targets[d.name] += kept
            room -= kept


def _reasons(demands: Sequence[Demand], targets: dict[str, int], budget: int) -> dict[str, str]:
    reasons = {}
    for d in demands:
        target = targets[d.name]
        if target == d.current:
            continue
        if d.halted:
            why = "breaker halts it"
        elif d.backlog == 0:
            why = "no backlog"
        else:
            why = f"backlog {d.backlog}, limits {d.min}..{d.max}, budget {budget}"
        reasons[d.name] = f"{d.current} -> {target}: {why}"
    return reasons
