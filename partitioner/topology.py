"""The validated partitions, their queues and the routes from task names to them. Pure.

A task name is matched against every partition's glob patterns. The most specific pattern
wins: one without wildcards beats any glob, and among globs the one with more literal
characters wins (`shop.payment.refund` > `shop.payment.*` > `shop.*`). A name that matches two
partitions' patterns equally well is an error, not a coin toss. A name that matches nothing
goes to the `default` partition when one is declared.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from partitioner.breaker.machine import Policy
from partitioner.errors import RoutingError, SettingsError
from partitioner.settings import (
    BreakerSettings,
    Loc,
    Origins,
    PartitionSettings,
    Settings,
    setting_name,
)

DEFAULT_PARTITION = "default"
_WILDCARDS = re.compile(r"[*?]|\[[^\]]*\]")


@dataclass(frozen=True)
class Partition:
    """One bulkhead: its tasks, queues, limits and pool type."""

    name: str
    patterns: tuple[str, ...]
    queues: tuple[str, ...]
    min: int
    max: int
    concurrency: int
    prefetch: int
    pool: str
    breaker: BreakerSettings = field(default_factory=BreakerSettings)

    @property
    def queue(self) -> str:
        """The queue that tasks are routed to; a worker consumes all of `queues`."""
        return self.queues[0]

    @property
    def probe_queue(self) -> str:
        """Where the half-open breaker's probe tasks wait; consumed while half-open."""
        return f"{self.name}.probe"

    @property
    def parking_queue(self) -> str:
        """Where the producer gate parks tasks while the breaker is open; never consumed."""
        return f"{self.name}.parked"

    @property
    def breaker_queues(self) -> tuple[str, ...]:
        """The queues the breaker adds, when it is enabled."""
        if not self.breaker.enabled:
            return ()
        return self.probe_queue, self.parking_queue

    @property
    def policy(self) -> Policy:
        """The breaker's rules, in the pure state machine's terms."""
        b = self.breaker
        return Policy(
            window=b.window,
            window_calls=b.window_calls,
            window_ms=round(b.window_s * 1000),
            min_calls=b.min_calls,
            failure_rate=b.failure_rate,
            slow_call_ms=None if b.slow_call_s is None else round(b.slow_call_s * 1000),
            slow_call_rate=b.slow_call_rate,
            open_ms=round(b.open_s * 1000),
            open_backoff=b.open_backoff,
            open_max_ms=round(b.open_max_s * 1000),
            half_open_probes=b.half_open_probes,
        )

    def worker_name(self, host: str) -> str:
        """The Celery node name of this partition's worker on `host`."""
        return f"{self.name}@{host}"


@dataclass(frozen=True)
class Route:
    """Where one task name goes, and the pattern that sent it there (None: default)."""

    task: str
    partition: Partition
    queue: str
    pattern: str | None


def specificity(pattern: str) -> tuple[int, int]:
    """Sort key of a pattern: exact names first, then by count of literal characters."""
    literal = _WILDCARDS.sub("", pattern)
    exact = 0 if _WILDCARDS.search(pattern) else 1
    return exact, len(literal)


class Topology:
    """The partitions of one application and the routes of its task names."""

    def __init__(self, partitions: Iterable[Partition], budget: int) -> None:
        self.partitions = tuple(partitions)
        self.budget = budget
        self.by_name = {p.name: p for p in self.partitions}
        self.default = self.by_name.get(DEFAULT_PARTITION)
        self._by_queue = {q: p for p in self.partitions for q in (*p.queues, *p.breaker_queues)}
        self._patterns = sorted(
            ((pattern, p) for p in self.partitions for pattern in p.patterns),
            key=lambda item: specificity(item[0]),
            reverse=True,
        )
        self._routes: dict[str, Route] = {}

    @classmethod
    def from_settings(cls, settings: Settings, origins: Origins | None = None) -> Topology:
        """Build and check the topology; raises `SettingsError` naming each bad setting."""
        partitions = [_partition(name, ps) for name, ps in settings.partitions.items()]
        budget = settings.budget or sum(p.max for p in partitions) or 1
        problems = list(_problems(settings, partitions, budget))
        if problems:
            where = origins.of if origins else (lambda loc: "default")
            raise SettingsError(
                [f"{setting_name(loc)} ({where(loc)}): {message}" for loc, message in problems]
            )
        return cls(partitions, budget)

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue of every partition, the breakers' included, in declaration order."""
        return tuple(self._by_queue)

    def partition_of_queue(self, queue: str) -> Partition | None:
        """The partition that owns `queue`, if any."""
        return self._by_queue.get(queue)

    def route(self, task: str) -> Route:
        """The partition and queue for a task name; raises `RoutingError` if there is none."""
        try:
            return self._routes[task]
        except KeyError:
            route = self._routes[task] = self._resolve(task)
            return route

    def _resolve(self, task: str) -> Route:
        matches = [(pattern, p) for pattern, p in self._patterns if fnmatchcase(task, pattern)]
        if matches:
            best = specificity(matches[0][0])
            tied = {p.name for pattern, p in matches if specificity(pattern) == best}
            if len(tied) > 1:
                claims = ", ".join(
                    f"{pattern!r} of partition {p.name!r}"
                    for pattern, p in matches
                    if specificity(pattern) == best
                )
                raise RoutingError(
                    f"task {task!r} matches {claims} equally well; add its exact name to "
                    "the tasks of the partition that should own it"
                )
            pattern, partition = matches[0]
            return Route(task, partition, partition.queue, pattern)
        if self.default is not None:
            return Route(task, self.default, self.default.queue, None)
        raise RoutingError(
            f"task {task!r} matches no partition's tasks; add a pattern for it to "
            "partitions.<name>.tasks, or declare a [partitions.default] partition "
            "to catch unmatched tasks"
        )


def _partition(name: str, ps: PartitionSettings) -> Partition:
    return Partition(
        name=name,
        patterns=tuple(ps.tasks),
        queues=tuple(ps.queues) or (name,),
        min=ps.min,
        max=ps.ceiling,
        concurrency=ps.initial,
        prefetch=ps.prefetch,
        pool=ps.pool,
        breaker=ps.breaker,
    )


def _problems(
    settings: Settings, partitions: list[Partition], budget: int
) -> Iterable[tuple[Loc, str]]:
    if not partitions:
        yield (
            ("partitions",),
            ("no partitions are declared; add a [partitions.<name>] table with tasks = [...]"),
        )
        return

    for p in partitions:
        yield from _limit_problems(p)

    yield from _sharing_problems(partitions)

    total_min = sum(p.min for p in partitions)
    if total_min > budget:
        yield (
            ("budget",),
            (
                f"the partitions' min add up to {total_min}, more than the budget {budget}; "
                "raise budget or lower some min"
            ),
        )
    cluster_budget = settings.cluster_budget
    if cluster_budget is not None and total_min > cluster_budget:
        yield (
            ("cluster_budget",),
            (
                f"the partitions' min add up to {total_min}, more than the cluster budget "
                f"{cluster_budget}; raise cluster_budget or lower some min"
            ),
        )
    total = sum(p.concurrency for p in partitions)
    if total > budget:
        yield (
            ("budget",),
            (
                f"the partitions' concurrency adds up to {total}, more than the budget {budget}; "
                "raise budget or lower some concurrency"
            ),
        )


def _limit_problems(p: Partition) -> Iterable[tuple[Loc, str]]:
    loc: Loc = ("partitions", p.name)
    if not p.patterns and p.name != DEFAULT_PARTITION:
        yield (*loc, "tasks"), "is empty; list the glob patterns of the task names it owns"
    if p.min > p.max:
        yield (*loc, "min"), f"min {p.min} is above max {p.max}"
    if not p.min <= p.concurrency <= p.max:
        yield (
            (*loc, "concurrency"),
            (f"concurrency {p.concurrency} is outside its limits min {p.min}..max {p.max}"),
        )
    if p.pool == "solo" and p.max > 1:
        yield (*loc, "max"), "a solo pool runs one task at a time; set max = 1 or pool = prefork"


def _sharing_problems(partitions: list[Partition]) -> Iterable[tuple[Loc, str]]:
    owner_of_pattern: dict[str, str] = {}
    owner_of_queue: dict[str, str] = {}
    for p in partitions:
        for pattern in p.patterns:
            other = owner_of_pattern.setdefault(pattern, p.name)
            if other != p.name:
                yield (
                    ("partitions", p.name, "tasks"),
                    (
                        f"pattern {pattern!r} is claimed by partitions {other!r} and {p.name!r}; "
                        "a task pattern belongs to one partition"
                    ),
                )
        for queue in p.queues:
            other = owner_of_queue.setdefault(queue, p.name)
            if other != p.name:
                yield (
                    ("partitions", p.name, "queues"),
                    (
                        f"queue {queue!r} is used by partitions {other!r} and {p.name!r}; "
                        "each partition needs queues of its own"
                    ),
                )
