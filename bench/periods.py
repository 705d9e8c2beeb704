"""The figures of a "failing" run: payment's open periods, its executions per phase and
its recovery. Pure: no clock, no Redis.

Inputs are the run's phases, the breaker transitions heard on the breaker channel and
the executions in the shop's completion ledger. Times are wall-clock seconds: a
transition's `at_ms` comes from the Redis server's clock, a ledger entry's `done_at`
from the worker's `time.time()`, the same clock on this one host.

An open period starts at a transition to `open` and ends at the next transition to
`closed` or `open` (the `half_open` between them is part of the period). An execution
counts in the period, or phase, in which it ended (its `done_at`): a task already
running when the breaker opened counts against that period.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.traffic import Sent

# The transitions that end an open period.
PERIOD_ENDS = ("closed", "open")


@dataclass(frozen=True)
class Change:
    """One breaker transition, as published on the breaker channel."""

    partition: str
    old: str
    new: str
    reason: str
    at: float
    until: float = 0.0  # end of the open period, for a transition to open

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Change:
        """From the message: partition, old, new, reason, at_ms, until_ms."""
        return cls(
            partition=str(event["partition"]),
            old=str(event["old"]),
            new=str(event["new"]),
            reason=str(event["reason"]),
            at=int(event["at_ms"]) / 1000,
            until=int(event.get("until_ms") or 0) / 1000,
        )


@dataclass(frozen=True)
class Execution:
    """One task that ran, from the ledger: when it ended and whether it succeeded."""

    done_at: float
    ok: bool


@dataclass
class Phase:
    """One phase of traffic: its window, the tasks sent and those the gate rejected."""

    name: str
    start: float
    end: float
    sent: list[Sent] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # services of the rejected tasks


@dataclass
class Run:
    """One layout's run: its phases, every breaker transition heard, the ledger."""

    key: str
    title: str
    grace_s: float  # after the last phase's window, the run's tasks may still end
    ready_s: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    ledger: list[dict[str, Any]] = field(default_factory=list)

    @property
    def end(self) -> float:
        """The end of the measured run: the last phase's window and grace."""
        return self.phases[-1].end + self.grace_s

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def changes_of(self, partition: str) -> list[Change]:
        return [c for c in self.changes if c.partition == partition]

    def executions_of(self, service: str) -> list[Execution]:
        """The executions of `service` in the ledger, by the time they ended."""
        found = [
            Execution(float(e["done_at"]), bool(e.get("ok")))
            for e in self.ledger
            if e.get("service") == service
        ]
        return sorted(found, key=lambda e: e.done_at)


@dataclass(frozen=True)
class Period:
    """One open period: its bounds, what ended it, the executions that ended in it."""

    number: int
    start: float
    end: float
    ended_by: str  # "closed", "open", or "run end" while still open when the run ended
    reason: str
    executions: int
    failed: int

    def as_dict(self, origin: float) -> dict[str, Any]:
        """Plain data for the JSON results, times in seconds from `origin`."""
        found = asdict(self)
        found["start"] = round(self.start - origin, 3)
        found["end"] = round(self.end - origin, 3)
        return found


@dataclass(frozen=True)
class ServicePhase:
    """One service in one phase: tasks sent, rejected at publish, run and failed."""

    phase: str
    sent: int
    rejected: int
    executed: int
    failed: int


def between(executions: Iterable[Execution], start: float, end: float) -> list[Execution]:
    """The executions that ended in [start, end)."""
    return [e for e in executions if start <= e.done_at < end]


def failed(executions: Iterable[Execution]) -> int:
    """How many of `executions` failed."""
    return sum(1 for e in executions if not e.ok)


def per_phase(run: Run, service: str) -> list[ServicePhase]:
    """`service`'s figures per phase; a phase's executions end before the next starts."""
    phases = run.phases
    ends = [p.start for p in phases[1:]] + [run.end]
    executions = run.executions_of(service)
    found = []
    for phase, end in zip(phases, ends, strict=True):
        ran = between(executions, phase.start, end)
        sent = sum(1 for s in phase.sent if s.service == service)
        rejected = phase.rejected.count(service)
        found.append(ServicePhase(phase.name, sent, rejected, len(ran), failed(ran)))
    return found


def before_trip(run: Run, partition: str, fault_at: float) -> list[Execution]:
    """`partition`'s executions from the fault's start to its first `open`."""
    opened = next((c.at for c in run.changes_of(partition) if c.new == "open"), fault_at)
    return between(run.executions_of(partition), fault_at, opened)


def open_periods(run: Run, partition: str) -> list[Period]:
    """Every open period of `partition`'s breaker, with the executions in it."""
    changes = run.changes_of(partition)
    executions = run.executions_of(partition)
    periods: list[Period] = []
    for index, change in enumerate(changes):
        if change.new != "open":
            continue
        ending = next((c for c in changes[index + 1 :] if c.new in PERIOD_ENDS), None)
        end = ending.at if ending is not None else run.end
        ended_by = ending.new if ending is not None else "run end"
        inside = between(executions, change.at, end)
        number, count = len(periods) + 1, len(inside)
        periods.append(
            Period(number, change.at, end, ended_by, change.reason, count, failed(inside))
        )
    return periods


def full_throughput_at(
    executions: Sequence[Execution], since: float, needed: int, window_s: float = 1.0
) -> float | None:
    """Start of the first `window_s` window holding `needed` successful executions.

    The window starts at a successful execution that ended at or after `since`, so the
    answer is the moment from which the partition ran at full throughput again.
    """
    done = [e.done_at for e in executions if e.ok and e.done_at >= since]
    for index, start in enumerate(done):
        if index + needed <= len(done) and done[index + needed - 1] < start + window_s:
            return start
    return None


def needed_per_window(rate_per_s: float, share: float, window_s: float = 1.0) -> int:
    """Successful executions in a window that make `share` of the send rate."""
    return max(1, math.ceil(rate_per_s * share * window_s - 1e-9))


@dataclass(frozen=True)
class Recovery:
    """Seconds from the dependency's recovery to each sign that payment works again."""

    open_left_s: float | None  # of the open period at recovery; None: closed then
    closed_s: float | None  # the transition to closed
    first_ok_s: float | None  # the first successful execution ending after that
    full_s: float | None  # full throughput, by `full_throughput_at`


def recovery(run: Run, partition: str, recovered_at: float, needed: int) -> Recovery:
    """How `partition` came back after its dependency recovered at `recovered_at`."""
    changes = run.changes_of(partition)
    executions = run.executions_of(partition)
    before = [c for c in changes if c.at <= recovered_at]
    last = before[-1] if before else None
    open_left = None
    if last is not None and last.new != "closed":
        open_left = round(max(0.0, last.until - recovered_at), 3)  # 0 when half_open

    after = [c.at for c in changes if c.at > recovered_at and c.new == "closed"]
    closed = after[0] if after else None
    first_ok = None
    if closed is not None:
        ok = [e.done_at for e in executions if e.ok and e.done_at >= closed]
        first_ok = ok[0] if ok else None
    full = full_throughput_at(executions, recovered_at, needed)
    return Recovery(
        open_left_s=open_left,
        closed_s=_since(closed, recovered_at),
        first_ok_s=_since(first_ok, recovered_at),
        full_s=_since(full, recovered_at),
    )


def _since(moment: float | None, origin: float) -> float | None:
    return None if moment is None else round(moment - origin, 3)
