"""The breaker's state machine and its sliding windows. Pure: no clock, no Redis.

Every function takes the time (`now_ms`, milliseconds of the shared clock) and returns a new
value; nothing is mutated. The Redis store runs the same rules in Lua scripts, and the tests
drive both with the same sequences to prove they agree.

    closed --(min_calls reached and failure or slow-call rate at its threshold)--> open
    open --(open period over)--> half_open
    half_open --(half_open_probes probes succeeded)--> closed
    half_open --(a probe failed or was slow)--> open, for open_s x open_backoff^reopens

Each half-open period has an id (the time it began); a probe's outcome carries the id of the
period that admitted it, and counts only in that period. A probe that has not reported when
the period's deadline (one open period, 10 s at least) passes is given up: its permit is
granted again.

`forced_open`, `disabled` and `metrics_only` are set by hand and left only by hand. A
`metrics_only` breaker keeps its window but never opens; a `disabled` one records nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Literal

BUCKETS = 10  # a time window is this many buckets of window_ms / BUCKETS each
# A half-open period waits this long at least for its probes before granting lost ones again.
PROBE_DEADLINE_MIN_MS = 10_000


class State(str, enum.Enum):
    """A breaker's state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"
    METRICS_ONLY = "metrics_only"

    def __str__(self) -> str:
        return self.value

    @property
    def halts(self) -> bool:
        """True when the partition's normal traffic is halted."""
        return self in (State.OPEN, State.HALF_OPEN, State.FORCED_OPEN)


MANUAL = (State.FORCED_OPEN, State.DISABLED, State.METRICS_ONLY)


@dataclass(frozen=True)
class Policy:
    """When a breaker opens and for how long; durations in milliseconds."""

    window: Literal["count", "time"] = "count"
    window_calls: int = 20
    window_ms: int = 30_000
    min_calls: int = 10
    failure_rate: float = 0.5
    slow_call_ms: int | None = None
    slow_call_rate: float = 0.8
    open_ms: int = 10_000
    open_backoff: float = 2.0
    open_max_ms: int = 300_000
    half_open_probes: int = 3

    @property
    def bucket_ms(self) -> int:
        """Length of one bucket of the time window."""
        return max(1, self.window_ms // BUCKETS)

    def open_for_ms(self, reopens: int) -> int:
        """How long the breaker stays open after `reopens` consecutive re-opens."""
        return min(self.open_max_ms, int(self.open_ms * self.open_backoff**reopens))

    def probe_deadline_ms(self, reopens: int) -> int:
        """How long a half-open period waits for its probes: one open period, 10 s at least."""
        return max(self.open_for_ms(reopens), PROBE_DEADLINE_MIN_MS)


@dataclass(frozen=True)
class Outcome:
    """How one task ended: failed or not, slow or not, and the half-open period that
    admitted it as a probe (0: not a probe)."""

    failed: bool
    slow: bool = False
    probe: int = 0


@dataclass(frozen=True)
class Counts:
    """Calls, failures and slow calls in a window."""

    calls: int = 0
    failures: int = 0
    slow: int = 0

    def rate(self, part: int) -> float:
        return part / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class Window:
    """The outcomes a decision looks at: the last N calls, or the calls of the last T ms.

    A count window keeps a code per call, newest first (bit 0: failed, bit 1: slow); a
    time window keeps counts per bucket of `bucket_ms`, keyed by bucket number.
    """

    codes: tuple[int, ...] = ()
    buckets: tuple[tuple[int, Counts], ...] = ()

    def add(self, policy: Policy, outcome: Outcome, now_ms: int) -> Window:
        if policy.window == "count":
            code = int(outcome.failed) | int(outcome.slow) << 1
            return replace(self, codes=((code, *self.codes))[: policy.window_calls])
        current = now_ms // policy.bucket_ms
        kept = {n: c for n, c in self.buckets if n > current - BUCKETS}
        old = kept.get(current, Counts())
        kept[current] = Counts(
            old.calls + 1, old.failures + outcome.failed, old.slow + outcome.slow
        )
        return replace(self, buckets=tuple(sorted(kept.items())))

    def counts(self, policy: Policy, now_ms: int) -> Counts:
        if policy.window == "count":
            return Counts(
                len(self.codes),
                sum(code & 1 for code in self.codes),
                sum(code >> 1 for code in self.codes),
            )
        current = now_ms // policy.bucket_ms
        live = [c for n, c in self.buckets if current - BUCKETS < n <= current]
        return Counts(
            sum(c.calls for c in live),
            sum(c.failures for c in live),
            sum(c.slow for c in live),
        )


@dataclass(frozen=True)
class Transition:
    """A change of state, with the reason in figures."""

    old: State
    new: State
    reason: str
    until_ms: int = 0


@dataclass(frozen=True)
class Breaker:
    """One partition's breaker at one moment."""

    state: State = State.CLOSED
    until_ms: int = 0  # end of the open period, or the half-open period's deadline
    reopens: int = 0  # consecutive re-opens from half_open
    period: int = 0  # id of the half-open period: the time it began
    permits: int = 0  # probes admitted in this half_open period
    probe_ok: int = 0  # of which succeeded
    window: Window = field(default_factory=Window)

    def advance(self, policy: Policy, now_ms: int) -> tuple[Breaker, Transition | None]:
        """Move from open to half_open once the open period is over; in half_open, grant
        again the permits of probes that did not report before the deadline."""
        if self.state is State.OPEN and now_ms >= self.until_ms:
            open_for_ms = policy.open_for_ms(self.reopens)
            moved = replace(
                self,
                state=State.HALF_OPEN,
                until_ms=now_ms + policy.probe_deadline_ms(self.reopens),
                period=max(now_ms, 1),  # 0 marks an outcome that is no probe
                permits=0,
                probe_ok=0,
            )
            reason = f"open for {open_for_ms / 1000:g} s"
            return moved, Transition(self.state, moved.state, reason)
        if self.state is State.HALF_OPEN and now_ms >= self.until_ms:
            until_ms = now_ms + policy.probe_deadline_ms(self.reopens)
            return replace(self, until_ms=until_ms, permits=self.probe_ok), None
        return self, None

    def record(
        self, policy: Policy, outcome: Outcome, now_ms: int
    ) -> tuple[Breaker, Transition | None]:
        """Count one task's outcome and open or close the breaker if it decides so."""
        breaker, moved = self.advance(policy, now_ms)
        if breaker.state in (State.CLOSED, State.METRICS_ONLY):
            breaker = replace(breaker, window=breaker.window.add(policy, outcome, now_ms))
            if breaker.state is State.CLOSED:
                return breaker._maybe_trip(policy, now_ms, moved)
        elif breaker.state is State.HALF_OPEN and outcome.probe == breaker.period:
            return breaker._judge_probe(policy, outcome, now_ms)
        return breaker, moved

    def claim(self, policy: Policy, now_ms: int) -> tuple[Breaker, bool, Transition | None]:
        """Claim one probe permit; granted only in half_open and only `half_open_probes`."""
        breaker, moved = self.advance(policy, now_ms)
        if breaker.state is State.HALF_OPEN and breaker.permits < policy.half_open_probes:
            return replace(breaker, permits=breaker.permits + 1), True, moved
        return breaker, False, moved

    def set(
        self, state: State, reason: str, keep_window: bool = False
    ) -> tuple[Breaker, Transition | None]:
        """Put the breaker in `state` by hand. Its window is cleared, unless `keep_window`
        (a manual close that keeps the evidence: failures still in it may re-open it)."""
        if state in (State.OPEN, State.HALF_OPEN):
            raise ValueError(f"{state} is reached by the breaker itself, not set by hand")
        moved = Breaker(state=state, window=self.window if keep_window else Window())
        if state is self.state:
            return moved, None
        return moved, Transition(self.state, state, reason)

    def _maybe_trip(
        self, policy: Policy, now_ms: int, moved: Transition | None
    ) -> tuple[Breaker, Transition | None]:
        counts = self.window.counts(policy, now_ms)
        if counts.calls < policy.min_calls:
            return self, moved
        failure_rate = counts.rate(counts.failures)
        slow_rate = counts.rate(counts.slow)
        if failure_rate >= policy.failure_rate:
            reason = (
                f"failure rate {failure_rate:.0%} ({counts.failures} of {counts.calls} calls)"
                f" >= {policy.failure_rate:.0%}"
            )
        elif policy.slow_call_ms is not None and slow_rate >= policy.slow_call_rate:
            reason = (
                f"slow-call rate {slow_rate:.0%} ({counts.slow} of {counts.calls} calls over "
                f"{policy.slow_call_ms / 1000:g} s) >= {policy.slow_call_rate:.0%}"
            )
        else:
            return self, moved
        return self._open(policy, now_ms, reopens=0, reason=reason)

    def _judge_probe(
        self, policy: Policy, outcome: Outcome, now_ms: int
    ) -> tuple[Breaker, Transition | None]:
        if outcome.failed or outcome.slow:
            what = "failed" if outcome.failed else "was slow"
            reason = f"probe {what} ({self.probe_ok} of {policy.half_open_probes} succeeded)"
            return self._open(policy, now_ms, reopens=self.reopens + 1, reason=reason)
        ok = self.probe_ok + 1
        if ok >= policy.half_open_probes:
            closed = Breaker()
            reason = f"{ok} of {policy.half_open_probes} probes succeeded"
            return closed, Transition(self.state, closed.state, reason)
        return replace(self, probe_ok=ok), None

    def _open(
        self, policy: Policy, now_ms: int, reopens: int, reason: str
    ) -> tuple[Breaker, Transition]:
        until_ms = now_ms + policy.open_for_ms(reopens)
        opened = Breaker(state=State.OPEN, until_ms=until_ms, reopens=reopens)
        return opened, Transition(self.state, opened.state, reason, until_ms)
