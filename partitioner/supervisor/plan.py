"""The planner: target concurrency per partition from what was observed. Pure.

Rules, in order:

- every partition gets at least its `min`; a partition whose breaker halts it, and a
  partition with no backlog, get exactly their `min`, so their capacity goes elsewhere;
  a half-open one gets one process for its probes, if its `min` is 0;
- a partition with backlog wants one process per task of it, up to its `max`;
- every partition with backlog gets one process at least, while the budget allows;
- what the budget has left after every `min` is shared between the partitions that want
  more, in proportion to their backlog, no partition above what it wants;
- a busy partition keeps its size within `cooldown_s` of its last change, so that a steady
  load, or backlogs trading places, never flap; what that holds back comes out of growth
  elsewhere, except one process for each partition with backlog.

Invariants, for any input with sum(min) <= budget: min <= target <= max for every
partition, and sum(target) <= budget.

With many hosts, `plan_cluster` plans host by host: each host within its own budget and what
the cluster budget has left, for the backlog the hosts before it have not taken. `stage`
then holds back growth that running tasks of shrinking pools still occupy, so that the
tasks running at once never exceed a budget, during a change included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Demand:
    """One partition as the planner sees it."""

    name: str
    min: int
    max: int
    current: int
    backlog: int
    halted: bool = False  # its breaker is open or forced open, or its worker crash-loops
    probing: bool = False  # its breaker is half-open: one process runs the probes

    @property
    def wants(self) -> int:
        """The concurrency it would use: its backlog, within its limits; min when idle."""
        if self.halted or self.backlog == 0:
            return self.min
        if self.probing:
            return max(self.min, 1)
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
    # First, one process to each partition with backlog and none (min 0), largest backlog
    # first, so that a small backlog is not starved by a large one.
    for d in sorted(demands, key=lambda d: (-d.backlog, d.name)):
        if spare > 0 and targets[d.name] == 0 and d.wants > 0:
            targets[d.name] = 1
            spare -= 1
    # Then water-filling: each round gives every partition that still wants more a share
    # of what is left in proportion to its backlog (at least 1 to the largest backlogs),
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
    # A busy partition within its cooldown keeps its size, so that backlogs trading places
    # do not move capacity back and forth every step. What the held sizes take beyond the
    # budget is taken back from growth first (never below one process for a partition with
    # backlog), then from the held sizes themselves, largest first.
    ideal = dict(targets)
    held = set()
    for d in demands:
        cooling = since_change_s.get(d.name, float("inf")) < cooldown_s
        busy = d.backlog > 0 and not (d.halted or d.probing)
        if cooling and busy and targets[d.name] < d.current:
            targets[d.name] = min(d.current, d.max)
            held.add(d.name)
    floors = {
        d.name: ideal[d.name] if d.name in held else max(d.min, min(d.current, ideal[d.name]),
                                                         min(1, ideal[d.name]))
        for d in demands
    }  # fmt: skip
    excess = sum(targets.values()) - budget
    while excess > 0:
        growing = [
            d.name for d in demands if d.name not in held and targets[d.name] > floors[d.name]
        ]
        keeping = [name for name in held if targets[name] > floors[name]]
        pool = growing or keeping
        name = max(pool, key=lambda n: (targets[n] - floors[n], n))
        targets[name] -= 1
        excess -= 1


def _reasons(demands: Sequence[Demand], targets: dict[str, int], budget: int) -> dict[str, str]:
    return {
        d.name: f"{d.current} -> {targets[d.name]}: {why(d, budget)}"
        for d in demands
        if targets[d.name] != d.current
    }


def why(d: Demand, budget: int) -> str:
    """The figures behind a partition's target, in words."""
    if d.halted:
        return "breaker halts it"
    if d.probing:
        return f"breaker half-open: probes, backlog {d.backlog}"
    if d.backlog == 0:
        return "no backlog"
    return f"backlog {d.backlog}, limits {d.min}..{d.max}, budget {budget}"


@dataclass(frozen=True)
class Host:
    """One host's partitions as the planner sees them; `current` is this host's size."""

    name: str
    budget: int
    demands: Sequence[Demand]


def plan_cluster(
    hosts: Sequence[Host],
    backlog: Mapping[str, int],
    cluster_budget: int | None = None,
    since_change_s: Mapping[tuple[str, str], float] | None = None,
    cooldown_s: float = 10.0,
) -> dict[str, Plan]:
    """A plan per host for the partitions' whole `backlog`, in host name order.

    Each host gets its partitions' `min` whatever its budget or the cluster budget says
    (the caller warns of that); what is above them is shared within the host's budget and
    the cluster budget's remainder.
    """
    ordered = sorted(hosts, key=lambda h: h.name)
    mins = [sum(d.min for d in h.demands) for h in ordered]
    left = dict(backlog)
    cluster_left = math.inf if cluster_budget is None else cluster_budget
    since = since_change_s or {}
    plans = {}
    for i, host in enumerate(ordered):
        room = cluster_left - sum(mins[i + 1 :])
        # The mins always: a host whose budget or share cannot hold them runs them anyway.
        budget = max(mins[i], int(min(host.budget, room)))
        demands = [replace(d, backlog=left.get(d.name, 0)) for d in host.demands]
        mine = {d.name: since[(host.name, d.name)] for d in demands if (host.name, d.name) in since}
        found = plan(demands, budget, mine, cooldown_s)
        for name, target in found.targets.items():
            left[name] = max(0, left.get(name, 0) - target)
        cluster_left -= sum(found.targets.values())
        plans[host.name] = found
    return plans


def stage(
    targets: Mapping[str, int],
    current: Mapping[str, int],
    held: Mapping[str, int],
    budget: int,
) -> dict[str, int]:
    """The sizes to set now on one host on the way to `targets`.

    A shrink applies at once, but a pool keeps the tasks it `held` (running or reserved)
    until they end; growth is held back until the budget has room beside them. Growth is
    taken back from the largest step first.
    """
    staged = dict(targets)

    def in_use() -> int:
        return sum(max(staged[p], held.get(p, 0)) for p in staged)

    while in_use() > budget:
        floors = {p: max(current.get(p, 0), held.get(p, 0)) for p in staged}
        growing = [p for p in staged if staged[p] > floors[p]]
        if not growing:
            break  # only running tasks are over the budget; they end by themselves
        largest = max(growing, key=lambda p: (staged[p] - floors[p], p))
        staged[largest] -= 1
    return staged
