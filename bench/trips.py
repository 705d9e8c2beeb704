"""The log of a "breakers" run and the figures drawn from it. Pure: no clock, no Redis.

A run is a `Schedule` of rounds on the wall clock; in each round the dependency fails
for `fail_s`, then recovers for `recover_s`. The processes log every `Call` they made
and every `Change` of the shared breaker state they caused. Times are wall-clock
seconds (`time.time()`, the same clock as the Redis server's on this one host).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Rounds from `start`: the dependency fails `fail_s`, then works `recover_s`."""

    start: float
    rounds: int
    fail_s: float
    recover_s: float

    @property
    def round_s(self) -> float:
        return self.fail_s + self.recover_s

    @property
    def end(self) -> float:
        return self.fail_at(self.rounds)

    def fail_at(self, round_no: int) -> float:
        """When round `round_no` (from 0) starts, and its dependency starts failing."""
        return self.start + round_no * self.round_s

    def recover_at(self, round_no: int) -> float:
        """When the dependency recovers in round `round_no`."""
        return self.fail_at(round_no) + self.fail_s

    def failing(self, at: float) -> bool:
        """True when a call starting at `at` fails."""
        if not self.start <= at < self.end:
            return False
        return (at - self.start) % self.round_s < self.fail_s


@dataclass(frozen=True)
class Call:
    """One call to the dependency: when it ran and was reported, how it ended."""

    pid: int
    start: float
    end: float
    reported: float
    failed: bool
    probe: bool  # let through as a half-open probe rather than as a normal call


@dataclass(frozen=True)
class Change:
    """A breaker state that one process wrote to the shared store."""

    pid: int
    at: float
    state: str  # "open", "half_open" or "closed"
    until: float = 0.0  # when the open period ends, for "open"


@dataclass(frozen=True)
class OpenPeriod:
    """One open period and the half-open period that followed it."""

    opened: float  # the first time a process recorded it
    until: float
    probes: int  # probe calls admitted because this open period ended
    probes_late: int  # of which started after the half-open period had ended
    failing_calls: int  # calls it let through while failing: from `until` to the next
    open_s: float | None  # measured: from `opened` to the first probe


@dataclass(frozen=True)
class RoundFigures:
    """What one breaker did in one round of failure and recovery."""

    round_no: int
    failing_calls: int  # calls to the dependency while it failed
    threshold_at: float | None  # end of the threshold-th failed call
    wasted: int  # normal calls started after `threshold_at`, while failing
    in_flight: int  # calls running when `threshold_at` came
    periods: tuple[OpenPeriod, ...]
    recovered_s: float | None  # from recovery to the first change to "closed"


def round_figures(
    round_no: int,
    schedule: Schedule,
    threshold: int,
    calls: Sequence[Call],
    changes: Sequence[Change],
) -> RoundFigures:
    """The figures of round `round_no`, from every process's log."""
    lo, mid = schedule.fail_at(round_no), schedule.recover_at(round_no)
    hi = schedule.fail_at(round_no + 1)
    mine = [c for c in calls if lo <= c.start < hi]
    failing = [c for c in mine if c.start < mid]

    ends = sorted(c.end for c in failing)
    threshold_at = ends[threshold - 1] if len(ends) >= threshold else None
    after = math.inf if threshold_at is None else threshold_at
    wasted = sum(1 for c in failing if not c.probe and c.start > after)
    in_flight = sum(1 for c in failing if c.start <= after < c.end)

    opens = [ch for ch in changes if ch.state == "open" and lo <= ch.at < hi]
    closes = [ch.at for ch in changes if ch.state == "closed" and mid <= ch.at < hi]
    return RoundFigures(
        round_no=round_no,
        failing_calls=len(failing),
        threshold_at=threshold_at,
        wasted=wasted,
        in_flight=in_flight,
        periods=open_periods(opens, closes, mine, mid),
        recovered_s=min(closes) - mid if closes else None,
    )


def open_periods(
    opens: Sequence[Change],
    closes: Sequence[float],
    calls: Sequence[Call],
    recover_at: float,
) -> tuple[OpenPeriod, ...]:
    """The distinct open periods, each with the calls it let through.

    Several processes may record the same open period (pybreaker lets each one whose
    call failed open the breaker again); its end, `until`, tells them apart. A probe
    belongs to the last open period that had ended when it started. The half-open
    period that follows ends when the breaker opens again or closes; a probe that
    starts later was let through on a stale view of the breaker.
    """
    first: dict[float, float] = {}
    for change in sorted(opens, key=lambda ch: ch.at):
        first.setdefault(round(change.until, 3), change.at)
    ordered = sorted((opened, until) for until, opened in first.items())

    periods = []
    for k, (opened, until) in enumerate(ordered):
        last = k + 1 == len(ordered)
        next_opened, next_until = (math.inf, math.inf) if last else ordered[k + 1]
        probes = [c for c in calls if c.probe and until <= c.start < next_until]
        failing = [c for c in calls if until <= c.start < min(next_until, recover_at)]
        first_probe = min((c.start for c in probes), default=None)
        ended = min([next_opened, *(at for at in closes if at >= until)])
        periods.append(
            OpenPeriod(
                opened=opened,
                until=until,
                probes=len(probes),
                probes_late=sum(1 for c in probes if c.start >= ended),
                failing_calls=len(failing),
                open_s=None if first_probe is None else first_probe - opened,
            )
        )
    return tuple(periods)


def histogram(values: Sequence[int]) -> str:
    """`1 x12` or `3 x2, 8 x5`: each value and how many times it occurs."""
    if not values:
        return "none"
    return ", ".join(f"{value} x{n}" for value, n in sorted(Counter(values).items()))


def spread(values: Sequence[float], unit: str = "s") -> str:
    """`0.52 s (0.10-0.98)`: the mean and the range, or `n/a`."""
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:.2f} {unit} ({min(values):.2f}-{max(values):.2f})"
