"""Scenario "shifting load": does capacity follow a surge that moves between services?

With stock Celery, 200 notification tasks of 50 ms finish in about 2.8 s on a shared
pool of four processes and in about 10.6 s when each service has a process of its own.
Four layouts of the reference shop, each sized for a budget of 4 processes, run one
after the other on one Redis database (flushed before each), so that no layout's
processes compete with another's for the machine's CPUs; the tables put them side by
side:

- shared: stock Celery, one worker with a prefork pool of 4 consuming the four
  services' queues;
- static: stock Celery, one worker per service with a pool of 1;
- autoscale: stock Celery, one worker per service with `--autoscale 4,1` (Celery's
  own autoscaler, which sizes each worker on its own: it has no total budget);
- partitioner: `partitioner launch` with every partition at `min = 0`, `max = 4`,
  `concurrency = 1`, budget 4, breakers off, the supervisor on.

The Partitioner settings are what a user would write to get the shared pool's speed for
whichever service has the work, within the budget the static layout keeps. With four
services and a budget of 4, a `min` of 1 each would leave the supervisor nothing to
move, so every `min` is 0; a `max` of 4 lets one service use the whole budget;
`concurrency = 1` starts each partition as in the static layout until the first plan,
and is the static layout when `supervisor.enabled = false`.

Once a layout's workers answer and hold no task (and Partitioner's pools are back at
their `min`), a burst of 200 `shop.notification.send` tasks of 50 ms is published; as
soon as the last of them has ended, the surge shifts: a burst of 200
`shop.inventory.reserve` tasks.

Measured per surge, from the shop's completion ledger: the makespan (last completion
minus first publish), its ratio to the shared pool's, and the peak total concurrency,
the most tasks running at once across the fleet, exact from each task's start and end.
For Partitioner also the peaks of the partitions' summed `slots` (effective
concurrency) and `size` (live pool processes), from `observe()` every 100 ms. Target for
Partitioner in each surge: makespan at most 1.15x the shared pool's, peak total
concurrency at most the budget, 4.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from argparse import ArgumentParser, Namespace
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import layouts, options, report, runinfo
from bench.fleet import BROKER_ERRORS, Fleet, run_in_workdir, running
from bench.isolation import flush_broker
from bench.options import Option
from bench.traffic import Sent, burst
from partitioner import PartitionerError
from partitioner.app import Partitioner, partitioner_of
from partitioner.observe import observe
from partitioner.settings import SupervisorSettings
from workers import control

log = logging.getLogger("bench.shifting")
Entry = dict[str, Any]  # one task's completion in the shop's ledger

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/13"
OUTPUT_REL = Path("bench") / "results" / "shifting.json"
BUDGET = layouts.SHOP_BUDGET
TARGET_MAKESPAN_RATIO = 1.15
LAYOUTS = ("shared", "static", "autoscale", "partitioner")
LEDGER_POLL_S = 0.05
# The observe command's replies: a sample waits this long for every partition's worker.
REPLY_TIMEOUT_S = 0.5
OBSERVE_ERRORS = (PartitionerError, *BROKER_ERRORS)

# The options of the scenarios that watch a Partitioner fleet's pools.
POOL_OPTIONS: list[Option] = [
    ("--interval", float, SupervisorSettings().interval_s, "the supervisor's interval_s"),
    ("--idle-timeout", float, 15.0, "seconds to wait for the pools to be back at min"),
    ("--loglevel", str, "info", "workers' log level (their output goes to files)"),
]
OPTIONS: list[Option] = [
    ("--broker", str, DEFAULT_BROKER_URL, "Redis URL; the database is FLUSHED"),
    ("--tasks", int, 200, "tasks in each surge"),
    ("--work-ms", float, 50.0, "milliseconds one task works"),
    ("--surges", str, "notification,inventory", "comma-separated services, in turn"),
    ("--layouts", str, ",".join(LAYOUTS), "comma-separated layouts to run"),
    ("--sample-ms", float, 100.0, "milliseconds between two observations of the pools"),
    ("--surge-timeout", float, 60.0, "seconds a surge may take before it is cut short"),
    *POOL_OPTIONS,
]

EPILOG = """\
example:
  scripts/bench shifting                         # the full run, about 1.5 minutes
  python -m bench.shifting --layouts shared,partitioner --surges notification
"""


def partitioner_layout(
    workdir: Path,
    token: str,
    loglevel: str,
    interval_s: float,
) -> Fleet:
    """`partitioner launch` within `SHIFTING_LIMITS`, the supervisor on."""
    supervisor = {"enabled": True, "interval_s": interval_s}
    limits = layouts.SHIFTING_LIMITS
    return layouts.limited_fleet(workdir, token, loglevel, limits, supervisor)


def second_partitioner(fleet: Fleet) -> Partitioner:
    """Another app on the settings of a Partitioner fleet, for a thread of its own."""
    config = Path(fleet.env["PARTITIONER_CONFIG"])
    return partitioner_of(layouts.partitioner_app(config))


def builders(args: Namespace) -> dict[str, Callable[[Path, str, str], Fleet]]:
    """Each layout's fleet, by its key."""
    stock = layouts.routed_stock_fleet
    one, each = partial(stock, per_service=False), partial(stock, per_service=True)
    return {
        "shared": partial(one, sizing=["--concurrency", str(BUDGET)]),
        "static": partial(each, sizing=["--concurrency", "1"]),
        "autoscale": partial(each, sizing=["--autoscale", f"{BUDGET},1"]),
        "partitioner": partial(partitioner_layout, interval_s=args.interval),
    }


def fleet_parser(
    scenario: str, doc: str | None, epilog: str, table: list[Option], output: Path
) -> ArgumentParser:
    """A scenario's parser, with `--output` (default `output`) and `--keep-logs`."""
    parser = options.parser(scenario, doc, epilog, table)
    add = parser.add_argument
    add("--output", type=Path, help=f"JSON results file ({output})")
    add("--keep-logs", action="store_true", help="keep the workers' log files")
    return parser


def parse_args(argv: list[str] | None) -> Namespace:
    parser = fleet_parser("shifting", __doc__, EPILOG, OPTIONS, OUTPUT_REL)
    args = parser.parse_args(argv)

    use = ", ".join(LAYOUTS)
    args.layouts = options.chosen(parser, "--layouts", args.layouts, LAYOUTS, use)
    services = layouts.SHIFTING_LIMITS
    use = ", ".join(services)
    args.surges = options.chosen(parser, "--surges", args.surges, services, use)
    options.require_redis(parser, args.broker, "the ledger lives on the broker")
    if args.tasks < 1 or args.sample_ms <= 0 or args.interval <= 0:
        parser.error("--tasks, --sample-ms and --interval must be positive")
    args.output = args.output or layouts.REPO_ROOT / OUTPUT_REL
    return args


# Observing Partitioner's pools ------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The partitions' pools at one moment: `at` (epoch s), when the answer came."""

    at: float
    slots: dict[str, int]
    size: dict[str, int]
    running: dict[str, int]
    backlog: dict[str, int]
    complete: bool  # every partition's worker answered

    @classmethod
    def take(cls, partitioner: Partitioner, timeout_s: float) -> Sample:
        """Observe every partition; raises `PartitionerError` if the broker fails."""
        expected = len(partitioner.topology.partitions)
        found = observe(partitioner, timeout_s, expected=expected)
        return cls(
            at=time.time(),
            slots={o.name: o.slots for o in found},
            size={o.name: o.size for o in found},
            running={o.name: o.running for o in found},
            backlog={o.name: o.backlog for o in found},
            complete=all(o.workers for o in found),
        )

    def idle(self, minimum: Mapping[str, int]) -> bool:
        """True when no partition has backlog and each is at its `min`."""
        at_min = all(self.slots[name] == low for name, low in minimum.items())
        return self.complete and at_min and not any(self.backlog.values())


class PoolSampler:
    """Samples of the pools every `period_s`, taken in a thread of its own."""

    def __init__(self, partitioner: Partitioner, period_s: float) -> None:
        self.partitioner = partitioner
        self.period_s = period_s
        self.samples: list[Sample] = []
        self.errors = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PoolSampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        """Stop sampling; the samples, in order."""
        self._stopped.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        while not self._stopped.is_set():
            began = time.monotonic()
            try:
                self.samples.append(Sample.take(self.partitioner, REPLY_TIMEOUT_S))
            except OBSERVE_ERRORS as exc:
                self.errors += 1
                log.debug("sample failed: %s", exc)
            self._stopped.wait(max(0.0, self.period_s - (time.monotonic() - began)))


def wait_idle(partitioner: Partitioner, timeout_s: float) -> bool:
    """Wait until every partition is at its `min` with no backlog; False on timeout."""
    minimum = {p.name: p.min for p in partitioner.topology.partitions}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(*OBSERVE_ERRORS):
            if Sample.take(partitioner, REPLY_TIMEOUT_S).idle(minimum):
                return True
        time.sleep(LEDGER_POLL_S)
    log.warning(
        "pools not back at their min (%s) after %.0f s: is the supervisor on?",
        ", ".join(f"{name} {low}" for name, low in minimum.items()),
        timeout_s,
    )
    return False


# Measuring from the ledger ---------------------------------------------------------


def wait_done(sent: Sequence[Sent], start: int, timeout_s: float) -> list[Entry]:
    """Ledger entries of `sent` from index `start`, once all are in or timed out."""
    store = control.require_client()
    wanted = {task.id for task in sent}
    found: list[Entry] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = control.read_ledger(store, start)
        start += len(new)
        found += [entry for entry in new if entry["id"] in wanted]
        if len(found) >= len(wanted):
            break
        time.sleep(LEDGER_POLL_S)
    return found


def running_steps(entries: Iterable[Entry]) -> list[tuple[float, int]] | None:
    """The tasks running just after each start and end, from the entries' `started_at`
    and `done_at`, in time order; None when an entry has no `started_at` (a ledger of
    workers that do not record it)."""
    events: list[tuple[float, int]] = []
    for entry in entries:
        if "started_at" not in entry:
            return None
        events += [(float(entry["started_at"]), 1), (float(entry["done_at"]), -1)]
    # At equal times an end sorts before a start: a task handed over is not two tasks.
    steps = []
    running = 0
    for at, step in sorted(events):
        running += step
        steps.append((at, running))
    return steps


def peak_running(entries: Iterable[Entry]) -> int | None:
    """The most tasks running at once; None as for `running_steps`."""
    steps = running_steps(entries)
    return None if steps is None else max((running for _, running in steps), default=0)


@dataclass
class Surge:
    """One burst of tasks to one service, and what it took."""

    service: str
    sent: int
    completed: int
    first_sent_at: float
    last_done_at: float | None
    peak_running: int | None
    peak_slots: int | None = None
    peak_size: int | None = None
    samples: int = 0

    @property
    def makespan_s(self) -> float | None:
        """Last completion minus first publish; None unless every task completed."""
        if self.last_done_at is None or self.completed < self.sent:
            return None
        return self.last_done_at - self.first_sent_at

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the JSON results."""
        makespan = self.makespan_s
        shown = None if makespan is None else round(makespan, 3)
        return asdict(self) | {"makespan_s": shown}


def run_surge(fleet: Fleet, service: str, args: Namespace) -> Surge:
    """Publish one burst to `service` and wait until every task of it has ended."""
    start = control.require_client().llen(control.LEDGER)
    sent = burst(fleet.app, service, args.tasks, args.work_ms / 1000.0)
    entries = wait_done(sent, start, args.surge_timeout)
    done = [float(entry["done_at"]) for entry in entries]
    return Surge(
        service=service,
        sent=len(sent),
        completed=sum(1 for entry in entries if entry.get("ok")),
        first_sent_at=min(task.sent_at for task in sent),
        last_done_at=max(done) if done else None,
        peak_running=peak_running(entries),
    )


def add_pool_peaks(surge: Surge, samples: Sequence[Sample]) -> None:
    """The peaks of summed `slots` and `size` during the surge, from whole samples."""
    end = surge.last_done_at or float("inf")
    within = [s for s in samples if surge.first_sent_at <= s.at <= end and s.complete]
    surge.samples = len(within)
    if within:
        surge.peak_slots = max(sum(s.slots.values()) for s in within)
        surge.peak_size = max(sum(s.size.values()) for s in within)


# Running the layouts ---------------------------------------------------------------


@dataclass
class LayoutResult:
    """One layout's surges, and Partitioner's pools as sampled meanwhile."""

    key: str
    title: str
    ready_s: float = 0.0
    idle_at_start: bool | None = None
    surges: list[Surge] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    failed_samples: int = 0


def run_layout(key: str, args: Namespace, workdir: Path) -> LayoutResult:
    """Start one layout's fleet, run the surges on it, and always stop it."""
    flush_broker(args.broker)
    fleet = builders(args)[key](workdir / key, layouts.unique_token(), args.loglevel)
    result = LayoutResult(key, fleet.title)
    with running(fleet, key) as ready_s:
        result.ready_s = ready_s
        fleet.settle()
        if key == "partitioner":
            run_observed(fleet, args, result)
        else:
            run_surges(fleet, args, result)
    return result


def run_surges(fleet: Fleet, args: Namespace, result: LayoutResult) -> None:
    """Every surge in turn, each as soon as the one before has ended."""
    for service in args.surges:
        log.info("%s: a surge of %d %s tasks", result.key, args.tasks, service)
        result.surges.append(run_surge(fleet, service, args))


def run_observed(fleet: Fleet, args: Namespace, result: LayoutResult) -> None:
    """The surges on a Partitioner fleet from idle, its pools sampled meanwhile."""
    observer = second_partitioner(fleet)
    result.idle_at_start = wait_idle(observer, args.idle_timeout)
    sampler = PoolSampler(observer, args.sample_ms / 1000.0).start()
    try:
        run_surges(fleet, args, result)
    finally:
        result.samples = sampler.stop()
        result.failed_samples = sampler.errors
    for surge in result.surges:
        add_pool_peaks(surge, result.samples)


# Reporting -------------------------------------------------------------------------


def verdict(surge: Surge, shared: Surge | None) -> tuple[float | None, bool | None]:
    """The makespan's ratio to the shared pool's, and whether the target is met."""
    if shared is None or shared.makespan_s is None:
        return None, None
    if surge.makespan_s is None:
        return None, False
    ratio = surge.makespan_s / shared.makespan_s
    within = surge.peak_running is not None and surge.peak_running <= BUDGET
    return ratio, ratio <= TARGET_MAKESPAN_RATIO and within


def surge_table(results: Mapping[str, LayoutResult], index: int) -> str:
    """Every layout's figures in one surge, as a markdown table."""
    shared = results["shared"].surges[index] if "shared" in results else None
    header = ["layout", "completed", "makespan s", "x shared", "peak running"]
    header += ["peak slots", "peak size", "target"]
    rows = []
    for key, result in results.items():
        surge = result.surges[index]
        ratio, met = verdict(surge, shared)
        rows.append([
            key,
            f"{surge.completed}/{surge.sent}",
            _number(surge.makespan_s, "{:.2f}"),
            _number(ratio, "{:.2f}x"),
            _number(surge.peak_running, "{}"),
            _number(surge.peak_slots, "{}"),
            _number(surge.peak_size, "{}"),
            _target(key, met),
        ])  # fmt: skip
    first = next(iter(results.values())).surges[index]
    title = f"#### Surge {index + 1}: {first.sent} {first.service} tasks"
    return f"{title}\n\n{report.table(header, rows)}"


def print_report(results: Mapping[str, LayoutResult], args: Namespace) -> None:
    """All tables, as markdown, on stdout."""
    print(f"### Shifting load: {args.tasks} tasks of {args.work_ms:g} ms per surge\n")
    for result in results.values():
        print(f"- {result.key}: {result.title} (ready in {result.ready_s:.1f} s)")
    print()
    surges = min(len(result.surges) for result in results.values())
    for index in range(surges):
        print(surge_table(results, index) + "\n")
    print(
        f"Target for partitioner: makespan <= {TARGET_MAKESPAN_RATIO:g}x the shared "
        f"pool's and peak running <= the budget {BUDGET}. Peak running is exact, from "
        "the ledger; peak slots and size: the partitions' sums, sampled by observe()."
    )


def write_json(
    results: Mapping[str, LayoutResult], args: Namespace, argv: list[str], wall_s: float
) -> None:
    """The run's figures and conditions, for the README to quote."""
    data: dict[str, Any] = runinfo.conditions("shifting", argv, args) | {
        "target": {"makespan_ratio": TARGET_MAKESPAN_RATIO, "peak_running": BUDGET},
        "wall_s": round(wall_s, 1),
        "layouts": {key: _layout_json(key, results) for key in results},
    }
    runinfo.write(args.output, data)
    log.info("wall time %.0f s", wall_s)


def _layout_json(key: str, results: Mapping[str, LayoutResult]) -> dict[str, Any]:
    result = results[key]
    found: dict[str, Any] = {
        "title": result.title,
        "ready_s": round(result.ready_s, 2),
        "idle_at_start": result.idle_at_start,
        "failed_samples": result.failed_samples,
        "surges": [],
    }
    shared = results.get("shared")
    for index, surge in enumerate(result.surges):
        ratio, met = verdict(surge, shared.surges[index] if shared else None)
        shown = None if ratio is None else round(ratio, 3)
        found["surges"].append(surge.as_dict() | {"ratio_to_shared": shown, "met": met})
    if result.samples and result.surges:
        found["pool_changes"] = changes(result.samples, result.surges[0].first_sent_at)
    return found


def changes(samples: Sequence[Sample], since: float) -> list[dict[str, Any]]:
    """The samples where a partition's `slots` or `size` changed; times from `since`."""
    shown: list[dict[str, Any]] = []
    last: tuple[dict[str, int], dict[str, int]] | None = None
    for sample in samples:
        pools = (sample.slots, sample.size)
        if sample.complete and pools != last:
            at_s = round(sample.at - since, 3)
            shown.append({"t_s": at_s, "slots": sample.slots, "size": sample.size})
            last = pools
    return shown


def run_all(args: Namespace, workdir: Path) -> dict[str, LayoutResult]:
    """Every chosen layout in turn, each fleet started and stopped in its turn."""
    return {key: run_layout(key, args, workdir) for key in args.layouts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(layouts.environment(args.broker))
    log.info("broker %s (flushed before each layout)", args.broker)

    started = time.monotonic()
    found = run_in_workdir("shifting", args.keep_logs, partial(run_all, args))
    if isinstance(found, int):
        return found
    print_report(found, args)
    write_json(found, args, argv, time.monotonic() - started)
    return 0


def _number(value: float | None, shape: str) -> str:
    return "-" if value is None else shape.format(value)


def _target(key: str, met: bool | None) -> str:
    if key != "partitioner":
        return ""
    return "-" if met is None else ("met" if met else "MISSED")


if __name__ == "__main__":
    sys.exit(main())
