"""Scenario "reaction": how many control intervals from a backlog on an idle
partition to its pool at the planned size?

`partitioner launch` runs the reference shop with the settings of the shifting-load
scenario (every partition `min = 0`, `max = 4`, `concurrency = 1`, budget 4, breakers
off), the supervisor on with `supervisor.cooldown_s = 1`, so that a pool is back at its
`min` soon after its tasks end. Once every partition is at its `min` with no backlog, a
burst of 8 tasks of 1 s is published to one partition (inventory) at t0; `observe()`
runs every 50 ms meanwhile. The planned size is what the supervisor should choose:
min(`max`, backlog, budget - the other partitions' `min`), 4 here.

Measured, per repeat (5 by default, each from idle): the seconds from t0 until the
partition's `slots` (effective concurrency) first reach the planned size, and the same
in control intervals (seconds / `supervisor.interval_s`); also until its `size` (live
pool processes) does, from the same samples, and until the planned number of its tasks
ran at once, exact from the ledger's start and end times. A sample counts at the moment
its answer came, so a figure is late by at most one poll. Target: the median and the
worst repeat reach the planned `slots` within 2 control intervals.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from argparse import Namespace
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import layouts, options, report, runinfo
from bench.fleet import Fleet, run_in_workdir, running
from bench.isolation import flush_broker
from bench.options import Option
from bench.shifting import (
    POOL_OPTIONS,
    Entry,
    PoolSampler,
    Sample,
    fleet_parser,
    running_steps,
    second_partitioner,
    wait_done,
    wait_idle,
)
from bench.traffic import burst
from partitioner.app import Partitioner
from workers import control

log = logging.getLogger("bench.reaction")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"
OUTPUT_REL = Path("bench") / "results" / "reaction.json"
TARGET_INTERVALS = 2.0

OPTIONS: list[Option] = [
    ("--broker", str, DEFAULT_BROKER_URL, "Redis URL; the database is FLUSHED"),
    ("--partition", str, "inventory", "the partition that gets the backlog"),
    ("--tasks", int, 8, "tasks in each burst"),
    ("--work-ms", float, 1000.0, "milliseconds one task works"),
    ("--repeats", int, 5, "bursts, each from idle"),
    ("--cooldown", float, 1.0, "the supervisor's cooldown_s"),
    ("--poll-ms", float, 50.0, "milliseconds between two observations of the pools"),
    *POOL_OPTIONS,
]

EPILOG = """\
example:
  scripts/bench reaction                         # the full run, about 25 s
  python -m bench.reaction --repeats 3 --interval 0.25
"""


def parse_args(argv: list[str] | None) -> Namespace:
    parser = fleet_parser("reaction", __doc__, EPILOG, OPTIONS, OUTPUT_REL)
    args = parser.parse_args(argv)

    known = layouts.SHIFTING_LIMITS
    if args.partition not in known:
        parser.error(f"--partition: unknown {args.partition!r}; use {', '.join(known)}")
    options.require_redis(parser, args.broker, "the ledger lives on the broker")
    if min(args.tasks, args.repeats) < 1 or min(args.interval, args.poll_ms) <= 0:
        parser.error("--tasks, --repeats, --interval and --poll-ms must be positive")
    args.output = args.output or layouts.REPO_ROOT / OUTPUT_REL
    return args


def planned_size(partitioner: Partitioner, name: str, backlog: int) -> int:
    """The size the supervisor should give partition `name` for `backlog` when the
    others are idle: min(max, backlog, budget - the others' min)."""
    topology = partitioner.topology
    others = sum(p.min for p in topology.partitions if p.name != name)
    return min(topology.by_name[name].max, backlog, topology.budget - others)


@dataclass
class Reaction:
    """One burst on an idle partition: seconds from t0 until each figure got there."""

    idle_before: bool
    completed: int
    slots_s: float | None
    size_s: float | None
    running_s: float | None

    def as_dict(self, interval_s: float) -> dict[str, Any]:
        """Plain data for the JSON results, the slots figure also in intervals."""
        found = {key: _rounded(value) for key, value in asdict(self).items()}
        intervals = _intervals(self.slots_s, interval_s)
        return found | {"slots_intervals": _rounded(intervals)}


def first_reached(
    samples: Sequence[Sample], t0: float, name: str, planned: int, figure: str
) -> float | None:
    """Seconds from t0 to the first whole sample with `figure` of `name` >= planned."""
    for sample in samples:
        pools: Mapping[str, int] = getattr(sample, figure)
        if sample.at >= t0 and sample.complete and pools[name] >= planned:
            return sample.at - t0
    return None


def all_running(entries: Sequence[Entry], t0: float, planned: int) -> float | None:
    """Seconds from t0 until `planned` tasks first ran at once, from the ledger."""
    steps = running_steps(entries) or []
    return next((at - t0 for at, running in steps if running >= planned), None)


def react_once(
    fleet: Fleet,
    observer: Partitioner,
    args: Namespace,
    planned: int,
) -> Reaction:
    """One burst from idle, observed until its tasks have ended."""
    idle = wait_idle(observer, args.idle_timeout)
    sampler = PoolSampler(observer, args.poll_ms / 1000.0).start()
    start = control.require_client().llen(control.LEDGER)
    work_s = args.work_ms / 1000.0
    timeout_s = args.tasks * work_s + args.idle_timeout

    t0 = time.time()
    sent = burst(fleet.app, args.partition, args.tasks, work_s)
    entries = wait_done(sent, start, timeout_s)
    samples = sampler.stop()

    name = args.partition
    return Reaction(
        idle_before=idle,
        completed=sum(1 for entry in entries if entry.get("ok")),
        slots_s=first_reached(samples, t0, name, planned, "slots"),
        size_s=first_reached(samples, t0, name, planned, "size"),
        running_s=all_running(entries, t0, planned),
    )


def run(args: Namespace, workdir: Path) -> tuple[str, int, list[Reaction]]:
    """Start the fleet, time every repeat, and always stop it."""
    supervisor = {
        "enabled": True,
        "interval_s": args.interval,
        "cooldown_s": args.cooldown,
    }
    limits = layouts.SHIFTING_LIMITS
    token = layouts.unique_token()
    fleet = layouts.limited_fleet(workdir, token, args.loglevel, limits, supervisor)
    observer = second_partitioner(fleet)
    planned = planned_size(observer, args.partition, args.tasks)
    reactions = []
    with running(fleet, "partitioner"):
        fleet.settle()
        for repeat in range(1, args.repeats + 1):
            found = react_once(fleet, observer, args, planned)
            shown = _seconds(found.slots_s, args.interval)
            log.info("repeat %d: from t0 to %d slots: %s", repeat, planned, shown)
            reactions.append(found)
    return fleet.title, planned, reactions


def summary(reactions: Sequence[Reaction], interval_s: float) -> dict[str, Any]:
    """Median and worst seconds to the planned slots; a repeat never there is worst.

    The target counts as met only if every repeat started from idle: a pool that was
    not back at its `min` says nothing about the time to grow from there.
    """
    times = [r.slots_s if r.slots_s is not None else float("inf") for r in reactions]
    median_s, worst_s = statistics.median(times), max(times)
    not_idle = sum(1 for r in reactions if not r.idle_before)
    return {
        "median_s": _finite(median_s),
        "worst_s": _finite(worst_s),
        "median_intervals": _finite(median_s / interval_s),
        "worst_intervals": _finite(worst_s / interval_s),
        "not_idle_before": not_idle,
        "met": worst_s / interval_s <= TARGET_INTERVALS and not not_idle,
    }


def print_report(
    title: str,
    planned: int,
    reactions: Sequence[Reaction],
    args: Namespace,
) -> None:
    """The repeats and their summary, as markdown, on stdout."""
    interval_s = args.interval
    burst_of = f"{args.tasks} tasks of {args.work_ms:g} ms"
    print(f"### Reaction: {burst_of} to idle {args.partition}\n")
    print(f"{title}; supervisor.interval_s {interval_s:g}; planned size {planned}\n")
    header = ["repeat", "idle before", "completed", "slots at plan", "size at plan"]
    header.append(f"{planned} running at once")
    rows = [
        [
            str(number),
            "yes" if r.idle_before else "NO",
            f"{r.completed}/{args.tasks}",
            _seconds(r.slots_s, interval_s),
            _seconds(r.size_s, interval_s),
            _seconds(r.running_s, interval_s),
        ]
        for number, r in enumerate(reactions, 1)
    ]
    print(report.table(header, rows) + "\n")
    found = summary(reactions, interval_s)
    verdict = "met" if found["met"] else "MISSED"
    print(
        f"Slots at the planned size: median {_seconds(found['median_s'], interval_s)}, "
        f"worst {_seconds(found['worst_s'], interval_s)}; target <= "
        f"{TARGET_INTERVALS:g} intervals from idle: {verdict}"
    )
    if found["not_idle_before"]:
        print(
            f"{found['not_idle_before']} repeat(s) began with pools not back at "
            "their min: no reaction from idle was measured there; is the supervisor "
            "on?"
        )


def write_json(
    title: str,
    planned: int,
    reactions: Sequence[Reaction],
    args: Namespace,
    argv: list[str],
) -> None:
    """The run's figures and conditions, for the README to quote."""
    data: dict[str, Any] = runinfo.conditions("reaction", argv, args) | {
        "title": title,
        "planned_size": planned,
        "target_intervals": TARGET_INTERVALS,
        "repeats": [r.as_dict(args.interval) for r in reactions],
        "summary": summary(reactions, args.interval),
    }
    runinfo.write(args.output, data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    os.environ.update(layouts.environment(args.broker))
    flush_broker(args.broker)
    log.info("broker %s (flushed)", args.broker)

    found = run_in_workdir("reaction", args.keep_logs, partial(run, args))
    if isinstance(found, int):
        return found
    print_report(*found, args)
    write_json(*found, args, argv)
    return 0


def _intervals(seconds: float | None, interval_s: float) -> float | None:
    return None if seconds is None else seconds / interval_s


def _seconds(seconds: float | None, interval_s: float) -> str:
    if seconds is None:
        return "not reached"
    return f"{seconds:.2f} s ({seconds / interval_s:.1f} intervals)"


def _finite(value: float) -> float | None:
    return None if value == float("inf") else round(value, 3)


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    sys.exit(main())
