"""Observing partitions: backlog (waiting + reserved + running) and pool sizes, on any broker.

Waiting messages are counted by the broker itself: a queue declaration answers with the
message count, and on Redis kombu adds up the extra list it keeps per message priority.
Reserved (prefetched) and running tasks are invisible to the broker's count, so every
partition worker answers one remote-control command with its own figures.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kombu.exceptions import OperationalError

from partitioner.app import WORKER_ENV, Partitioner
from partitioner.breaker.board import Breakers
from partitioner.breaker.store import Snapshot
from partitioner.errors import BrokerError, StoreUnavailable
from partitioner.settings import mask_url
from partitioner.supervisor.pool import ATTR as POOL_ATTR
from partitioner.supervisor.pool import PoolControl
from partitioner.topology import Partition

COMMAND = "partitioner_observe"
BROKER_TIMEOUT_S = 5.0


@dataclass
class PartitionObservation:
    """One partition's figures at one moment."""

    name: str
    queues: dict[str, int]
    min: int
    max: int
    reserved: int = 0
    running: int = 0
    workers: list[str] = field(default_factory=list)
    breaker: dict[str, Any] | None = None
    # The tasks the partition's workers may hold and run now, summed.
    slots: int = 0
    # Live pool processes (threads: thread limits), summed.
    size: int = 0
    # Mean run time in seconds of the latest tasks, over the workers that ran some.
    runtime_s: float | None = None
    # Each worker's pool, as it replies to the resize command.
    pools: list[dict[str, Any]] = field(default_factory=list)

    @property
    def concurrency(self) -> int:
        """The partition's concurrency now: its workers' slots."""
        return self.slots

    @property
    def waiting(self) -> int:
        """Messages in the partition's queues that no worker has fetched yet."""
        return sum(self.queues.values())

    @property
    def backlog(self) -> int:
        """Tasks waiting, reserved or running."""
        return self.waiting + self.reserved + self.running

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain data, for `status --json`."""
        derived = {"concurrency": self.concurrency, "waiting": self.waiting}
        return asdict(self) | derived | {"backlog": self.backlog}


def observe(
    partitioner: Partitioner, timeout_s: float = 1.0, expected: int | None = None
) -> list[PartitionObservation]:
    """Every partition's backlog and pools, from the broker and the workers' replies.

    The workers get `timeout_s` to reply; with `expected` replies in, the wait ends sooner.
    """
    waiting = waiting_counts(partitioner)
    observations = {
        p.name: PartitionObservation(
            name=p.name,
            queues={q: waiting.get(q, 0) for q in _queues(partitioner, p)},
            min=p.min,
            max=p.max,
        )
        for p in partitioner.topology.partitions
    }
    if partitioner.breakers is not None:
        for p in partitioner.breakers.gated:
            observations[p.name].breaker = _breaker(partitioner.breakers, p)
    runtimes: dict[str, list[float]] = {}
    for report in worker_reports(partitioner, timeout_s, expected):
        found = observations.get(str(report.get("partition")))
        if found is None:
            continue
        found.workers.append(str(report["worker"]))
        found.reserved += sum(report["reserved"].values())
        found.running += sum(report["running"].values())
        found.slots += int(report["slots"])
        found.size += int(report["size"])
        if report.get("pool"):
            found.pools.append(report["pool"])
        if report.get("runtime_s") is not None:
            runtimes.setdefault(found.name, []).append(float(report["runtime_s"]))
    for name, seen in runtimes.items():
        observations[name].runtime_s = sum(seen) / len(seen)
    return list(observations.values())


def _queues(partitioner: Partitioner, partition: Partition) -> tuple[str, ...]:
    # The probe and parking queues exist only where the breakers are on.
    if partitioner.breakers is None:
        return partition.queues
    return (*partition.queues, *partition.breaker_queues)


def _breaker(breakers: Breakers, partition: Partition) -> dict[str, Any]:
    try:
        return breaker_figures(breakers.snapshot(partition))
    except StoreUnavailable:
        return {"state": "unknown: breaker store unreachable"}


def breaker_figures(snapshot: Snapshot) -> dict[str, Any]:
    """A breaker's state and rates, for `status` and `breaker show`."""
    counts = snapshot.counts
    return {
        "state": str(snapshot.state),
        "calls": counts.calls,
        "failure_rate": round(counts.rate(counts.failures), 3),
        "slow_call_rate": round(counts.rate(counts.slow), 3),
        "half_open_in_s": round(snapshot.open_left_s, 3),
        "reopens": snapshot.reopens,
    }


def waiting_counts(partitioner: Partitioner) -> dict[str, int]:
    """Messages waiting in each partition queue, by queue name."""
    app = partitioner.app
    partitioner.find_broker()
    counts: dict[str, int] = {}
    try:
        # A pooled connection: the supervisor counts every step.
        with app.pool.acquire(block=True, timeout=BROKER_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            channel = connection.default_channel
            names = [n for p in partitioner.topology.partitions for n in _queues(partitioner, p)]
            if partitioner.broker_is_redis:
                return _redis_lengths(channel, names)
            for name in names:
                queue = partitioner.queues[name].bind(channel)
                counts[name] = int(queue.queue_declare().message_count)
    except connection_errors(app) as exc:
        raise unreachable(app, exc) from exc
    return counts


def _redis_lengths(channel: Any, names: list[str]) -> dict[str, int]:
    # What a queue declaration counts on Redis (the lists kombu keeps per priority step),
    # for every queue in one pipeline: a declaration per queue costs a round trip each, and
    # the supervisor counts every step.
    keys = [
        (name, channel._q_for_pri(name, step)) for name in names for step in channel.priority_steps
    ]
    with channel.client.pipeline(transaction=False) as pipe:
        for _, key in keys:
            pipe.llen(key)
        lengths = pipe.execute()
    counts = dict.fromkeys(names, 0)
    for (name, _), length in zip(keys, lengths, strict=True):
        counts[name] += int(length)
    return counts


def worker_reports(
    partitioner: Partitioner, timeout_s: float, expected: int | None = None
) -> list[dict[str, Any]]:
    """The replies of every partition worker to the observe command."""
    replies = partitioner.app.control.broadcast(
        COMMAND, reply=True, timeout=timeout_s, limit=expected or None
    )
    reports = []
    for reply in replies or []:
        for answer in reply.values():
            if isinstance(answer, dict) and "partition" in answer:
                reports.append(answer)
    return reports


def register() -> None:
    """Register the observe command in this worker process (called by `attach`)."""
    from celery.worker.control import Panel, inspect_command

    if COMMAND not in Panel.data:
        inspect_command(name=COMMAND)(_report)


def _report(state: Any, **kwargs: Any) -> dict[str, Any]:
    from celery.worker import state as worker_state

    active = set(worker_state.active_requests)
    reserved = set(worker_state.reserved_requests) - active
    worker = os.environ.get(WORKER_ENV, state.hostname)
    report: dict[str, Any] = {
        "worker": worker,
        "partition": worker.split("@", 1)[0],
        "running": _by_queue(active),
        "reserved": _by_queue(reserved),
    }
    control: PoolControl | None = getattr(state.consumer, POOL_ATTR, None)
    if control is None:
        # A worker without the pool step: its pool as Celery sees it.
        info = state.consumer.pool.info if state.consumer.pool is not None else {}
        size = len(info.get("processes", ())) or int(info.get("max-concurrency", 0))
        return report | {"slots": size, "size": size}
    figures = control.figures()
    return report | {
        "slots": figures["slots"],
        "size": figures["size"],
        "runtime_s": control.runtimes.mean_s,
        "pool": dict(figures),
    }


def _by_queue(requests: Iterable[Any]) -> dict[str, int]:
    return dict(Counter(str(r.delivery_info.get("routing_key")) for r in requests))


def unreachable(app: Any, exc: BaseException) -> BrokerError:
    """The error that says `app`'s broker cannot be reached, and what to check."""
    return BrokerError(
        f"cannot reach the broker at {mask_url(app.conf.broker_url)}: {exc}; is it "
        "running, and is PARTITIONER_BROKER_URL right?"
    )


def connection_errors(app: Any) -> tuple[type[BaseException], ...]:
    """The exceptions that mean the broker is unreachable, for `app`'s transport."""
    with app.connection_for_read() as connection:
        return (
            *connection.connection_errors,
            *connection.channel_errors,
            # ensure_connection() re-raises the transport's errors as this one.
            OperationalError,
            OSError,
        )
