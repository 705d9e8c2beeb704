"""pybreaker's side of the "breakers" scenario: a breaker on `CircuitRedisStorage`.

pybreaker is the optional extra "bench" (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import pybreaker
import redis

from bench.callers import NAMESPACE, PARTITION, DependencyDown, Log, Settings

if TYPE_CHECKING:
    from bench.callers import Dependency


class LoggedBreaker(pybreaker.CircuitBreaker):
    """A pybreaker breaker that logs the state changes this process makes.

    `open`, `half_open` and `close` run only in the process that decides the change;
    processes that merely notice it do not call them, so each change is logged once
    per process that wrote it, at the time that process decided it (pybreaker takes
    `opened_at` from its own clock at that moment too).
    """

    def __init__(
        self, settings: Settings, log: Log, storage: pybreaker.CircuitRedisStorage
    ) -> None:
        super().__init__(
            fail_max=settings.threshold,
            reset_timeout=settings.open_s,
            success_threshold=settings.probes,
            state_storage=storage,
            name=PARTITION,
        )
        self.storage = storage
        self.log = log

    @property
    def admitting(self) -> str:
        """The state that let the running call through (read inside the call)."""
        # NOTE: pybreaker has no public way to tell a trial call from a normal one; the
        # cached state object is the one whose `call` is running.
        return self._state.name

    def open(self) -> bool:
        at = time.time()
        tripped = super().open()
        # pybreaker keeps `opened_at` in whole seconds: its open period ends
        # reset_timeout after the start of the second it opened in.
        opened_at = self.storage.opened_at
        until = at if opened_at is None else opened_at.timestamp()
        self.log.change(at, "open", until + self.reset_timeout)
        return tripped

    def half_open(self) -> None:
        at = time.time()
        super().half_open()
        self.log.change(at, "half_open")

    def close(self) -> None:
        at = time.time()
        super().close()
        self.log.change(at, "closed")


class PybreakerCaller:
    """pybreaker as its documentation says: every call goes through `breaker.call`."""

    def __init__(self, settings: Settings, log: Log) -> None:
        client = redis.Redis.from_url(settings.redis_url)
        closed = pybreaker.STATE_CLOSED
        storage = pybreaker.CircuitRedisStorage(closed, client, namespace=NAMESPACE)
        self.breaker = LoggedBreaker(settings, log, storage)
        self.log = log

    def attempt(self, dependency: Dependency) -> bool:
        made: list[tuple[float, float, bool, bool]] = []

        def guarded() -> None:
            probe = self.breaker.admitting == pybreaker.STATE_HALF_OPEN
            start = time.time()
            try:
                dependency()
            except DependencyDown:
                made.append((start, time.time(), True, probe))
                raise
            made.append((start, time.time(), False, probe))

        # Refused, failed, or failed and opened the breaker: `made` tells which.
        with contextlib.suppress(DependencyDown, pybreaker.CircuitBreakerError):
            self.breaker.call(guarded)
        for start, end, failed, probe in made:
            self.log.call(start, end, failed, probe)
        return bool(made)
