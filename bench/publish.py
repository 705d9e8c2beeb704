"""Scenario "publish": what Partitioner's routing and producer gate cost a publisher.

One process publishes the shop's tasks to one Redis broker (database 7, flushed first)
through two Celery apps, each with its own connection pool:

- plain: a Celery app without Partitioner, with the same kombu queues (one per
  partition, on a direct exchange of the same name) and the same JSON serialiser;
  `app.send_task(name, kwargs=..., queue=<the partition's queue>)`;
- partitioner: the shop's app with Partitioner attached by `config/partitioner.toml`,
  every partition's breaker enabled and closed; `app.send_task(name, kwargs=...)`,
  which Partitioner's router sends to the partition's queue through the producer gate.

Each round publishes N tasks (20 000 by default) through each app, round-robin over
the four services' task names, in blocks of 200 that alternate between the apps
(plain, partitioner, partitioner, plain, ...), so that drift in the machine's load
falls on both alike; `--block` equal to `--tasks` alternates whole rounds instead. An
app's time in a round is the sum of its blocks' times, each from the first call of
`send_task` to the last return. One unmeasured round comes first. After each round the
queues are checked to hold exactly the tasks sent to them, then purged.

Measured: tasks a second per round, the median of each app's rounds, their ratio
(partitioner / plain) and the time Partitioner adds to one publish, from the medians.
Target: a ratio of at least 0.95. Beside it, two figures less exposed to the noise of
a shared machine: this process's CPU time per publish, and the time of routing alone
(Celery's `app.amqp.router.route`, which `send_task` calls, without the broker),
measured the same way. When the target is missed (or with `--profile`), one more
partitioner round runs under cProfile, and the time in Partitioner's functions is
reported against the time in `send_task`.
"""

from __future__ import annotations

import cProfile
import gc
import logging
import pstats
import statistics
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from bench import layouts, options, report, runinfo
from bench.isolation import flush_broker
from bench.options import Option
from bench.traffic import TASK_NAMES
from partitioner import PartitionerError, attach, load_settings
from partitioner.app import Partitioner, partitioner_of
from partitioner.breaker.machine import State

log = logging.getLogger("bench.publish")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
CONFIG_REL = Path("config") / "partitioner.toml"
OUTPUT_REL = Path("bench") / "results" / "publish.json"
APPS = ("plain", "partitioner")
TARGET_RATIO = 0.95
PROFILE_ROWS = 12
# Partitioner's own code, as cProfile names its files.
PACKAGE_DIR = str(Path(__file__).resolve().parent.parent / "partitioner")

OPTIONS: list[Option] = [
    ("--broker", str, DEFAULT_BROKER_URL, "Redis URL; the database is FLUSHED first"),
    ("--tasks", int, 20_000, "tasks published through each app per round"),
    ("--rounds", int, 5, "measured rounds"),
    ("--block", int, 200, "tasks per block; blocks alternate between the apps"),
    ("--warmup", int, 1_000, "tasks per app of the unmeasured first round"),
]

EPILOG = """\
example:
  scripts/bench publish                          # the full run, about 2.5 minutes
  python -m bench.publish --tasks 5000 --rounds 3 --profile
"""

# Publishes (or only routes) task number `n`.
Publish = Callable[[int], None]


@dataclass(frozen=True)
class Round:
    """One app in one round: calls a second, and this process's CPU time per call."""

    rate: float
    cpu_us: float


@dataclass
class Rounds:
    """The measured rounds, per app."""

    rounds: dict[str, list[Round]] = field(default_factory=lambda: {a: [] for a in APPS})

    def add(self, found: dict[str, Round]) -> None:
        for app in APPS:
            self.rounds[app].append(found[app])

    def median(self, app: str) -> float:
        """The median of the app's calls a second."""
        return statistics.median(r.rate for r in self.rounds[app])

    def median_us(self, app: str) -> float:
        """The app's median wall-clock microseconds per call."""
        return 1e6 / self.median(app)

    def median_cpu_us(self, app: str) -> float:
        return statistics.median(r.cpu_us for r in self.rounds[app])

    @property
    def ratio(self) -> float:
        return self.median("partitioner") / self.median("plain")

    @property
    def added_us(self) -> float:
        """Microseconds Partitioner adds to one call, from the medians."""
        return self.median_us("partitioner") - self.median_us("plain")

    @property
    def added_cpu_us(self) -> float:
        """CPU microseconds Partitioner adds to one call, from the medians."""
        return self.median_cpu_us("partitioner") - self.median_cpu_us("plain")


@dataclass(frozen=True)
class ProfileRow:
    """One function's time in the profiled round; microseconds per publish."""

    function: str
    calls: int
    own_us: float
    total_us: float


def parse_args(argv: list[str] | None) -> Namespace:
    parser = options.parser("publish", __doc__, EPILOG, OPTIONS)
    add = parser.add_argument
    add("--profile", action="store_true", help="profile a partitioner round anyway")
    add("--config", type=Path, help=f"Partitioner settings ({CONFIG_REL})")
    add("--output", type=Path, help=f"JSON results file ({OUTPUT_REL})")
    args = parser.parse_args(argv)

    options.require_redis(parser, args.broker, "the queues are checked on it")
    if min(args.tasks, args.rounds, args.block, args.warmup) < 1:
        parser.error("--tasks, --rounds, --block and --warmup must be at least 1")
    args.config = args.config or layouts.REPO_ROOT / CONFIG_REL
    args.output = args.output or layouts.REPO_ROOT / OUTPUT_REL
    try:
        load_settings(args.config, broker_url=args.broker)
    except PartitionerError as exc:
        parser.error(f"--config {args.config}: {exc}")
    return args


def partitioner_app(broker_url: str, config: Path) -> Celery:
    """The shop's app with Partitioner attached, on `broker_url`."""
    app = Celery("shop", include=["workers.services"])
    attach(app, *load_settings(config, broker_url=broker_url))
    return app


def plain_app(broker_url: str, queues: list[str]) -> Celery:
    """A Celery app without Partitioner, declaring the same queues the same way."""
    app = Celery("plain", broker=broker_url, include=["workers.services"])
    declared = [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in queues]
    app.conf.update(
        task_queues=declared,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    return app


def publishers(plain: Celery, ours: Celery) -> tuple[dict[str, Publish], dict[str, Publish]]:
    """Per app, a function that publishes task number `n`, and one that only routes it."""
    names = list(TASK_NAMES.values())
    queues = [partitioner_of(ours).topology.route(name).queue for name in names]
    count = len(names)
    plain_router, our_router = plain.amqp.router, ours.amqp.router

    def publish_plain(n: int) -> None:
        i = n % count
        plain.send_task(names[i], kwargs={"order_id": n}, queue=queues[i])

    def publish_ours(n: int) -> None:
        ours.send_task(names[n % count], kwargs={"order_id": n})

    # As `send_task` calls the router: a fresh options dict per task.
    def route_plain(n: int) -> None:
        i = n % count
        plain_router.route({"queue": queues[i]}, names[i], (), {"order_id": n})

    def route_ours(n: int) -> None:
        our_router.route({}, names[n % count], (), {"order_id": n})

    publish: dict[str, Publish] = {"plain": publish_plain, "partitioner": publish_ours}
    route: dict[str, Publish] = {"plain": route_plain, "partitioner": route_ours}
    return publish, route


@dataclass
class Clock:
    """One app's wall-clock and CPU seconds, summed over its blocks."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def run(self, publish: Publish, first: int, count: int) -> None:
        """Call `publish` for tasks `first` to `first + count - 1`, timed.

        CPU time leaves out the time this process waits for Redis or for a core that
        other processes hold.
        """
        started, started_cpu = time.perf_counter(), time.process_time()
        for n in range(first, first + count):
            publish(n)
        self.cpu_s += time.process_time() - started_cpu
        self.wall_s += time.perf_counter() - started

    def round(self, tasks: int) -> Round:
        return Round(tasks / self.wall_s, 1e6 * self.cpu_s / tasks)


def timed_round(publish: dict[str, Publish], tasks: int, block: int) -> dict[str, Round]:
    """Call each app's `publish` for `tasks` tasks, in blocks that alternate between
    the apps, in turn first and last (A B, B A, A B, ...)."""
    clocks = {app: Clock() for app in publish}
    order = list(clocks)
    gc.collect()
    for first in range(0, tasks, block):
        count = min(block, tasks - first)
        for app in order:
            clocks[app].run(publish[app], first, count)
        order.reverse()
    return {app: clock.round(tasks) for app, clock in clocks.items()}


class Queues:
    """The partitions' queues on the broker: what they should hold, and purging them."""

    def __init__(self, client: redis.Redis, partitioner: Partitioner) -> None:
        topology = partitioner.topology
        self.client = client
        self.names = list(topology.queues)
        self.routed = [topology.route(name).queue for name in TASK_NAMES.values()]

    def check_and_purge(self, tasks: int, apps: int) -> None:
        """Raise unless each queue holds what `apps` apps sent it; then empty them."""
        expected = {name: 0 for name in self.names}
        for n in range(tasks):
            expected[self.routed[n % len(self.routed)]] += apps
        found = {name: int(self.client.llen(name)) for name in self.names}
        self.client.delete(*self.names)
        if found != expected:
            raise RuntimeError(f"queues hold {found}, expected {expected}")


def run_rounds(publish: dict[str, Publish], queues: Queues, args: Namespace) -> Rounds:
    """One unmeasured round, then the measured rounds."""
    timed_round(publish, args.warmup, args.block)
    queues.check_and_purge(args.warmup, len(publish))
    rounds = Rounds()
    for number in range(1, args.rounds + 1):
        found = timed_round(publish, args.tasks, args.block)
        queues.check_and_purge(args.tasks, len(publish))
        rounds.add(found)
        rates = ", ".join(f"{app} {found[app].rate:.0f}" for app in APPS)
        log.info("round %d: tasks/s %s", number, rates)
    return rounds


def route_rounds(route: dict[str, Publish], args: Namespace) -> Rounds:
    """Routing alone, in the same rounds and blocks; no broker is involved."""
    timed_round(route, args.warmup, args.block)
    rounds = Rounds()
    for _ in range(args.rounds):
        rounds.add(timed_round(route, args.tasks, args.block))
    return rounds


def check_closed(app: Celery) -> None:
    """Raise unless every breaker is closed, as this process's producer gate sees it."""
    partitioner = partitioner_of(app)
    assert partitioner.view is not None and partitioner.breakers is not None
    for p in partitioner.breakers.gated:
        seen = partitioner.view.get(p.name)
        if seen is None or seen.now() is not State.CLOSED:
            raise RuntimeError(f"breaker of {p.name} is {seen}, not closed")


def profile_round(publish: Publish, queues: Queues, tasks: int) -> list[ProfileRow]:
    """A partitioner round under cProfile: `send_task`, then Partitioner's functions."""
    profiler = cProfile.Profile()
    profiler.runcall(timed_round, {"partitioner": publish}, tasks, tasks)
    queues.check_and_purge(tasks, 1)
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (path, line, function), (_, calls, own_s, total_s, _) in stats.items():
        ours = path.startswith(PACKAGE_DIR)
        if ours or (function == "send_task" and path.endswith("celery/app/base.py")):
            name = f"{Path(path).name}:{line}({function})" if ours else "Celery.send_task"
            own_us, total_us = own_s * 1e6 / tasks, total_s * 1e6 / tasks
            rows.append(ProfileRow(name, calls, own_us, total_us))
    rows.sort(key=lambda row: row.total_us, reverse=True)
    return rows[:PROFILE_ROWS]


def rounds_table(rounds: Rounds) -> str:
    header = ["round", *(f"{app} tasks/s" for app in APPS), "ratio"]
    header += [f"{app} CPU us/publish" for app in APPS]
    pairs = zip(*(rounds.rounds[app] for app in APPS), strict=True)
    rows = [
        [str(number), f"{plain.rate:.0f}", f"{ours.rate:.0f}",
         f"{ours.rate / plain.rate:.3f}", f"{plain.cpu_us:.0f}", f"{ours.cpu_us:.0f}"]
        for number, (plain, ours) in enumerate(pairs, start=1)
    ]  # fmt: skip
    return f"#### Rounds of send_task\n\n{report.table(header, rows)}"


def summary(rounds: Rounds, routing: Rounds) -> str:
    """Medians: the target's figure, then CPU time and routing alone beside it."""
    met = "met" if rounds.ratio >= TARGET_RATIO else "MISSED"
    plain_cpu, ours_cpu = (rounds.median_cpu_us(app) for app in APPS)
    share = 100 * routing.added_us / rounds.median_us("plain")
    header = ["measure", "plain", "partitioner", "throughput ratio", "added per publish"]
    rows = [
        ["send_task, tasks/s", f"{rounds.median('plain'):.0f}",
         f"{rounds.median('partitioner'):.0f}",
         f"{rounds.ratio:.3f} (target >= {TARGET_RATIO:g}: {met})",
         f"{rounds.added_us:.1f} us"],
        ["send_task, CPU us/publish", f"{plain_cpu:.0f}", f"{ours_cpu:.0f}",
         f"{plain_cpu / ours_cpu:.3f}", f"{rounds.added_cpu_us:.1f} us"],
        ["routing alone, us/task", *(f"{routing.median_us(app):.2f}" for app in APPS),
         "-", f"{routing.added_us:.2f} us ({share:.1f} % of a plain publish)"],
    ]  # fmt: skip
    note = "Medians of the rounds; throughput ratio: partitioner / plain."
    return f"#### Summary\n\n{note}\n\n{report.table(header, rows)}"


def profile_table(rows: list[ProfileRow]) -> str:
    header = ["function", "calls", "own us/publish", "total us/publish"]
    cells = [[r.function, str(r.calls), f"{r.own_us:.2f}", f"{r.total_us:.2f}"] for r in rows]
    note = "Under cProfile, which slows every call; compare the rows with each other."
    title = "Profile of one partitioner round"
    return f"#### {title}\n\n{note}\n\n{report.table(header, cells)}"


def print_report(
    rounds: Rounds, routing: Rounds, profile: list[ProfileRow], args: Namespace
) -> None:
    print(f"### Publish overhead: {conditions(args)}\n")
    print(rounds_table(rounds) + "\n")
    print(summary(rounds, routing))
    if profile:
        print("\n" + profile_table(profile))


def conditions(args: Namespace) -> str:
    return (
        f"{args.tasks} tasks per app and round, in blocks of {args.block} alternating "
        f"between the apps; {args.rounds} rounds, medians compared; broker "
        f"{args.broker}; every breaker closed."
    )


def write_json(
    results: tuple[Rounds, Rounds, list[ProfileRow]],
    args: Namespace,
    argv: list[str],
    wall_s: float,
) -> None:
    """The run's figures and conditions, for the README to quote."""
    rounds, routing, profile = results
    data = runinfo.conditions("publish", argv, args) | {
        "conditions": conditions(args),
        "wall_s": round(wall_s, 1),
        "target_ratio": TARGET_RATIO,
        "met": rounds.ratio >= TARGET_RATIO,
        "send_task": _rounds_json(rounds),
        "routing_alone": _rounds_json(routing),
        "profile_us_per_publish": [r.__dict__ for r in profile],
    }
    runinfo.write(args.output, data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.monotonic()

    flush_broker(args.broker)
    ours = partitioner_app(args.broker, args.config)
    plain = plain_app(args.broker, list(partitioner_of(ours).topology.queues))
    client = redis.Redis.from_url(args.broker, socket_timeout=5)
    queues = Queues(client, partitioner_of(ours))
    publish, route = publishers(plain, ours)

    rounds = run_rounds(publish, queues, args)
    check_closed(ours)
    routing = route_rounds(route, args)
    profile: list[ProfileRow] = []
    if args.profile or rounds.ratio < TARGET_RATIO:
        profile = profile_round(publish["partitioner"], queues, args.tasks)

    wall_s = time.monotonic() - started
    print_report(rounds, routing, profile, args)
    write_json((rounds, routing, profile), args, argv, wall_s)
    log.info("wall time %.0f s", wall_s)
    return 0


def _rounds_json(rounds: Rounds) -> dict[str, Any]:
    return {
        "rounds": {app: [r.__dict__ for r in rounds.rounds[app]] for app in APPS},
        "median_per_s": {app: round(rounds.median(app)) for app in APPS},
        "median_cpu_us": {app: round(rounds.median_cpu_us(app), 2) for app in APPS},
        "ratio": round(rounds.ratio, 4),
        "added_us": round(rounds.added_us, 3),
        "added_cpu_us": round(rounds.added_cpu_us, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
