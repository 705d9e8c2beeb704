"""This process's copy of every breaker's state, kept fresh by the published transitions.

The producer gate asks the view on every publish, so a publish to a closed partition costs
no Redis round trip. A thread listens on the transition channel and re-reads every breaker
each `refresh_s` in case a message was missed (a reconnect drops pub/sub messages). An open
period's end is known in advance, so the view turns open into half_open by itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from partitioner.breaker.board import Breakers
from partitioner.breaker.machine import State
from partitioner.errors import StoreUnavailable

log = logging.getLogger(__name__)

REFRESH_S = 1.0
RETRY_S = 1.0
RESUBSCRIBE_S = 0.05


@dataclass(frozen=True)
class Seen:
    """A breaker's state, and when (this process's monotonic clock) its open period ends."""

    state: State
    open_until: float = 0.0

    def now(self) -> State:
        if self.state is State.OPEN and time.monotonic() >= self.open_until:
            return State.HALF_OPEN
        return self.state

    @property
    def retry_after_s(self) -> float:
        """Seconds until probes are admitted (0 when not open)."""
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self.open_until - time.monotonic())


class BreakerView:
    """Breaker states by partition name; None for a partition while the store is away."""

    def __init__(
        self,
        breakers: Breakers,
        client: redis.Redis,
        channel: str,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.breakers = breakers
        self.client = client
        self.channel = channel
        self.refresh_s = refresh_s
        self.listeners: list[Callable[[str, Seen], None]] = []
        self._seen: dict[str, Seen] = {}
        self._pid = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def get(self, partition: str) -> Seen | None:
        """The partition's breaker as last seen, or None while the store is unreachable."""
        if self._pid != os.getpid():
            self._start()
        return self._seen.get(partition)

    def stop(self) -> None:
        """Stop listening (the thread ends within `refresh_s`)."""
        self._stopped.set()

    def refresh(self) -> None:
        """Read every gated breaker now; on failure, forget them all (the store is away)."""
        try:
            for p in self.breakers.gated:
                snapshot = self.breakers.snapshot(p)
                self._update(p.name, Seen(snapshot.state, _deadline(snapshot.open_left_s)))
        except StoreUnavailable:
            self._seen = {}
            raise

    def _start(self) -> None:
        # Once per process: a forked child (a prefork pool process, a gunicorn worker) needs
        # a thread of its own; redis-py gives it new connections by itself.
        with self._lock:
            if self._pid == os.getpid():
                return
            self._seen = {}
            # Until the thread reaches the store, the gates follow on_store_error.
            with contextlib.suppress(StoreUnavailable):
                self.refresh()
            thread = threading.Thread(target=self._listen, name="partitioner-breakers")
            thread.daemon = True
            thread.start()
            # Marked started only now: another thread's first publish waits on the lock for
            # this first read, rather than take the empty view for a store out of reach.
            self._pid = os.getpid()

    def _listen(self) -> None:
        while not self._stopped.is_set():
            try:
                self._follow()
            except (redis.RedisError, StoreUnavailable, OSError) as exc:
                if self._stopped.is_set():
                    return  # stopped while the store went away with its owner: no news
                log.debug("breaker subscription lost (%s); subscribing again", exc)
                # A dropped subscription (a reconnect, CLIENT KILL) is not a store gone away:
                # forgetting the breakers would open every gate to on_store_error. Only a
                # refresh that fails forgets them, and reports the store unreachable.
                try:
                    self.refresh()
                except StoreUnavailable:
                    self._stopped.wait(RETRY_S)
                else:
                    self._stopped.wait(RESUBSCRIBE_S)

    def _follow(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.channel)
            self.refresh()  # after subscribing, so that no transition falls in between
            refreshed = time.monotonic()
            while not self._stopped.is_set():
                message = pubsub.get_message(timeout=self.refresh_s)
                if message is not None:
                    self._on_message(message)
                if time.monotonic() - refreshed >= self.refresh_s:
                    self.refresh()
                    refreshed = time.monotonic()
        finally:
            pubsub.close()

    def _on_message(self, message: dict[str, Any]) -> None:
        event = json.loads(message["data"])
        left_s = max(0, int(event["until_ms"]) - int(event["at_ms"])) / 1000
        self._update(str(event["partition"]), Seen(State(event["new"]), _deadline(left_s)))

    def _update(self, partition: str, seen: Seen) -> None:
        old = self._seen.get(partition)
        self._seen[partition] = seen
        if old is None or old.state is not seen.state:
            for listener in self.listeners:
                listener(partition, seen)


def _deadline(left_s: float) -> float:
    return time.monotonic() + left_s if left_s else 0.0
