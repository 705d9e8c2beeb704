"""The processes of the "breakers" scenario: each calls a dependency through a breaker.

Every process runs the same loop against the same `Schedule`: ask the breaker, call
the dependency if it lets the call through, report the outcome. The dependency fails
every call that starts while it is failing and succeeds otherwise; a call takes
`call_ms`. A process that the breaker refuses waits `poll_ms` before it asks again.

A process keeps its calls and the breaker changes it caused in memory, and pushes them
to a Redis list once its loop is over, so that logging costs the loop nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from typing import Protocol

import redis

from bench.trips import Call, Change, Schedule
from partitioner.breaker.machine import Outcome, Policy, State
from partitioner.breaker.store import Snapshot
from partitioner.breaker.stores.redis import RedisStore

PARTITION = "payment"
NAMESPACE = "bench-breakers"
START_TIMEOUT_S = 60.0

Dependency = Callable[[], None]


class DependencyDown(Exception):
    """The payment gateway failed this call."""


@dataclass(frozen=True)
class Settings:
    """What every process of one breaker's run shares."""

    breaker: str  # "partitioner" or "pybreaker"
    redis_url: str
    threshold: int  # consecutive failures that open the breaker
    open_s: float  # how long the breaker stays open
    probes: int  # Partitioner's half_open_probes, pybreaker's success_threshold
    call_ms: float
    poll_ms: float

    @property
    def log_key(self) -> str:
        """The Redis list that the processes' logs are pushed to."""
        return f"bench:breakers:{self.breaker}:log"


@dataclass
class Log:
    """One process's calls and the breaker changes it caused."""

    pid: int
    calls: list[Call] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)

    def call(self, start: float, end: float, failed: bool, probe: bool) -> None:
        self.calls.append(Call(self.pid, start, end, time.time(), failed, probe))

    def change(self, at: float, state: str, until: float = 0.0) -> None:
        self.changes.append(Change(self.pid, at, state, until))

    def push(self, client: redis.Redis, key: str) -> None:
        calls = [asdict(c) for c in self.calls]
        changes = [asdict(c) for c in self.changes]
        entry = {"pid": self.pid, "calls": calls, "changes": changes}
        client.rpush(key, json.dumps(entry))


class Caller(Protocol):
    """One process's side of a breaker."""

    def attempt(self, dependency: Dependency) -> bool:
        """Call `dependency` if the breaker lets it through; True if it was called."""
        ...


def partitioner_policy(settings: Settings) -> Policy:
    """Partitioner's policy equivalent to pybreaker's `fail_max` and `reset_timeout`.

    A count window of `threshold` calls that opens at a failure rate of 100 % once it
    holds `threshold` calls is "`threshold` consecutive failures". No backoff: pybreaker
    stays open for `reset_timeout` every time.
    """
    open_ms = round(settings.open_s * 1000)
    return Policy(
        window="count",
        window_calls=settings.threshold,
        min_calls=settings.threshold,
        failure_rate=1.0,
        open_ms=open_ms,
        open_backoff=1.0,
        open_max_ms=open_ms,
        half_open_probes=settings.probes,
    )


class PartitionerCaller:
    """Partitioner's breaker as a gate would use it: snapshot, claim, record."""

    def __init__(self, settings: Settings, log: Log) -> None:
        self.store = RedisStore(redis.Redis.from_url(settings.redis_url), NAMESPACE)
        self.policy = partitioner_policy(settings)
        self.log = log

    def attempt(self, dependency: Dependency) -> bool:
        probe = self._admit()
        if probe is None:
            return False
        start = time.time()
        failed = _failed(dependency)
        end = time.time()
        outcome = Outcome(failed=failed, probe=probe)
        self._note(self.store.record(PARTITION, self.policy, outcome))
        self.log.call(start, end, failed, bool(probe))
        return True

    def _admit(self) -> int | None:
        """None: refused; 0: a normal call; else a probe, as its half-open period's id."""
        snapshot = self._note(self.store.snapshot(PARTITION, self.policy))
        if snapshot.state is State.CLOSED:
            return 0
        if snapshot.state is not State.HALF_OPEN:
            return None
        snapshot, granted = self.store.claim(PARTITION, self.policy)
        self._note(snapshot)
        return snapshot.period if granted else None

    def _note(self, snapshot: Snapshot) -> Snapshot:
        # The store's clock when it made the change: the moment every process saw it.
        at = snapshot.now_ms / 1000
        for moved in snapshot.transitions:
            self.log.change(at, moved.new.value, moved.until_ms / 1000)
        return snapshot


def make_caller(settings: Settings, log: Log) -> Caller:
    """The caller of `settings.breaker`."""
    if settings.breaker == "pybreaker":
        # pybreaker is an optional extra ("bench"): imported only when it is run.
        from bench.pybreaker_caller import PybreakerCaller

        return PybreakerCaller(settings, log)
    return PartitionerCaller(settings, log)


def payment(schedule: Schedule, call_s: float) -> None:
    """The payment gateway: `call_s` of work, failing while the schedule says so."""
    failing = schedule.failing(time.time())
    time.sleep(call_s)
    if failing:
        raise DependencyDown("payment gateway down")


def run(settings: Settings, ready: Queue[int], go: Queue[Schedule]) -> None:
    """One process: build the caller, wait for the schedule, loop, push the log."""
    log = Log(os.getpid())
    caller = make_caller(settings, log)
    ready.put(log.pid)
    schedule = go.get(timeout=START_TIMEOUT_S)

    time.sleep(max(0.0, schedule.start - time.time()))
    poll_s, call_s = settings.poll_ms / 1000, settings.call_ms / 1000
    while time.time() < schedule.end:
        if not caller.attempt(lambda: payment(schedule, call_s)):
            time.sleep(poll_s)

    client = redis.Redis.from_url(settings.redis_url)
    log.push(client, settings.log_key)
    client.close()


def _failed(dependency: Dependency) -> bool:
    try:
        dependency()
    except DependencyDown:
        return True
    return False
