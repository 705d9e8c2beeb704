"""Scenario "breakers": Partitioner's breaker against pybreaker, shared through Redis.

For each breaker in turn, 8 processes share one breaker for the payment dependency
through Redis (Partitioner: `RedisStore`, its Lua scripts; pybreaker:
`CircuitRedisStorage`). Each process loops: ask the breaker, call the dependency if it
lets the call through (a call takes 5 ms), report the outcome; when refused it waits
5 ms and asks again. Partitioner's process does what a gate does: `snapshot`; closed:
call; half_open: call only if `claim` grants a permit, and record the outcome as a
probe; open: do not call. pybreaker's process wraps the call in `breaker.call`.

The dependency fails every call for 3.5 s, then works for 2 s; 3 such rounds.

Equivalent settings. pybreaker opens after `fail_max` = 5 consecutive failures;
Partitioner's count window of the last 5 calls, with `min_calls` = 5 and a failure
rate of 100 %, opens on the same 5 failures in a row. Both stay open 1 s
(`reset_timeout` = 1; `open_ms` = 1000 with no backoff, since pybreaker has none), as
far as pybreaker can: it stores `opened_at` in whole seconds, so its open period ends
1 s after the start of the second it opened in. One success in half-open closes both
(`success_threshold` = 1; `half_open_probes` = 1); pybreaker has no limit on the trial
calls of a half-open period, which is what (2) measures.

Measured, per round, from each process's log of its calls (start, end, outcome, probe
or not) and of the state changes it wrote (pushed to a Redis list when the run ends):

1. wasted calls during the trip: normal calls that started after the 5th failed call
   ended, while the dependency was failing (the ones already running then are counted
   apart, as in flight);
2. probes per half-open period: calls let through as probes because a given open
   period ended, across the 8 processes (a period is known by its end time; the
   target for Partitioner is exactly `half_open_probes`), and how many of them started
   after another process had already ended that half-open period (re-opened or closed
   the breaker), on a stale view of its state;
3. calls to the failing dependency per open period: calls it let through once it
   ended (from its end to the end of the next), for the periods that ended while the
   dependency was still failing; the calls of the trip itself are (1) and the row
   "calls to the failing dependency, per round" counts every call;
4. time from the dependency's recovery until the breaker closed.
Also the open period as measured: from when it began to the start of its first probe.
Times are wall-clock: a change is timed by the Redis server's clock for Partitioner
(the time its script made it, in whole milliseconds) and by the deciding process's
clock for pybreaker.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import multiprocessing
import platform
import queue
import sys
import time
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import redis

from bench import callers, options, report, runinfo, trips
from bench.callers import Settings
from bench.options import Option
from bench.trips import Call, Change, RoundFigures, Schedule

log = logging.getLogger("bench.breakers")

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_REL = Path("bench") / "results" / "breakers.json"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
BREAKERS = ("partitioner", "pybreaker")
TITLES = {"partitioner": "Partitioner", "pybreaker": "pybreaker"}
READY_TIMEOUT_S = 60.0
START_DELAY_S = 0.3
JOIN_GRACE_S = 10.0

OPTIONS: list[Option] = [
    ("--redis", str, DEFAULT_REDIS_URL, "Redis URL; the database is FLUSHED first"),
    ("--processes", int, 8, "processes sharing the breaker"),
    ("--rounds", int, 3, "rounds of failure then recovery"),
    ("--fail-s", float, 3.5, "seconds the dependency fails in each round"),
    ("--recover-s", float, 2.0, "seconds it works after that in each round"),
    ("--threshold", int, 5, "consecutive failures that open the breaker"),
    ("--open-s", float, 1.0, "seconds the breaker stays open"),
    ("--probes", int, 1, "half_open_probes; pybreaker's success_threshold"),
    ("--call-ms", float, 5.0, "milliseconds one call to the dependency takes"),
    ("--poll-ms", float, 5.0, "milliseconds a refused process waits to ask again"),
    ("--breakers", str, ",".join(BREAKERS), "comma-separated breakers to run"),
]

EPILOG = """\
example:
  scripts/bench breakers                         # both breakers, about 40 s
  python -m bench.breakers --rounds 1 --breakers partitioner
"""


class BenchError(RuntimeError):
    """A process of the run did not start or did not end as expected."""


@dataclass(frozen=True)
class BreakerRun:
    """One breaker's run: its schedule and its figures per round."""

    breaker: str
    schedule: Schedule
    rounds: tuple[RoundFigures, ...]
    calls: int


def parse_args(argv: list[str] | None) -> Namespace:
    parser = options.parser("breakers", __doc__, EPILOG, OPTIONS)
    add = parser.add_argument
    add("--output", type=Path, help=f"JSON results file ({OUTPUT_REL})")
    args = parser.parse_args(argv)

    use = "partitioner and/or pybreaker"
    chosen = options.chosen(parser, "--breakers", args.breakers, BREAKERS, use)
    if "pybreaker" in chosen and importlib.util.find_spec("pybreaker") is None:
        parser.error("pybreaker is not installed: pip install -e '.[bench]'")
    for flag in ("processes", "rounds", "threshold", "probes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    args.breakers = chosen
    args.output = args.output or REPO_ROOT / OUTPUT_REL
    return args


def settings_for(breaker: str, args: Namespace) -> Settings:
    return Settings(
        breaker=breaker,
        redis_url=args.redis,
        threshold=args.threshold,
        open_s=args.open_s,
        probes=args.probes,
        call_ms=args.call_ms,
        poll_ms=args.poll_ms,
    )


def run_breaker(breaker: str, args: Namespace) -> BreakerRun:
    """Start the processes, give them one schedule, wait for them, read their logs."""
    settings = settings_for(breaker, args)
    context = multiprocessing.get_context("fork")
    ready: Queue[int] = context.Queue()
    go: Queue[Schedule] = context.Queue()
    task = (settings, ready, go)
    processes = [
        context.Process(target=callers.run, args=task, name=f"{breaker}-{n}")
        for n in range(args.processes)
    ]
    for process in processes:
        process.start()
    try:
        schedule = _start(processes, ready, go, args)
        until = _clock(schedule.end)
        log.info("%s: %d processes running until %s", breaker, len(processes), until)
        _join(processes, schedule)
    finally:
        _stop(processes)

    calls, changes = read_logs(settings)
    figures = [
        trips.round_figures(n, schedule, args.threshold, calls, changes) for n in range(args.rounds)
    ]
    return BreakerRun(breaker, schedule, tuple(figures), len(calls))


def read_logs(settings: Settings) -> tuple[list[Call], list[Change]]:
    """Every process's calls and changes, from the Redis list they pushed them to."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        entries = [json.loads(raw) for raw in client.lrange(settings.log_key, 0, -1)]
    finally:
        client.close()
    calls = [Call(**c) for entry in entries for c in entry["calls"]]
    changes = [Change(**c) for entry in entries for c in entry["changes"]]
    return calls, changes


def flush(url: str) -> None:
    """Empty the benchmark's database: breakers and logs of earlier runs."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def summary_rows(run: BreakerRun) -> list[str]:
    """One breaker's column of the summary table."""
    rounds = run.rounds
    periods = [p for r in rounds for p in r.periods]
    # Periods whose half-open period began while the dependency was still failing.
    failing_periods = [p for p in periods if p.until < _recover_at(run, p.opened)]
    recovered = [r.recovered_s for r in rounds if r.recovered_s is not None]
    not_closed = len(rounds) - len(recovered)
    unclosed = f", {not_closed} round(s) not closed" if not_closed else ""
    return [
        _per_round([r.wasted for r in rounds]),
        _per_round([r.in_flight for r in rounds]),
        _per_round([len(r.periods) for r in rounds]),
        trips.histogram([p.probes for p in periods]),
        str(sum(p.probes_late for p in periods)),
        trips.histogram([p.failing_calls for p in failing_periods]),
        _per_round([r.failing_calls for r in rounds]),
        trips.spread([p.open_s for p in periods if p.open_s is not None]),
        trips.spread(recovered) + unclosed,
    ]


ROW_TITLES = [
    "(1) wasted calls during the trip, per round",
    "calls in flight when the threshold was reached, per round",
    "open periods, per round",
    "(2) probes per half-open period (probes x periods)",
    "probes started after their half-open period had ended",
    "(3) calls to the failing dependency per open period (calls x periods)",
    "calls to the failing dependency, per round",
    "open period measured: mean (min-max)",
    "(4) recovery to closed: mean (min-max)",
]


def summary(runs: list[BreakerRun]) -> str:
    """Both breakers side by side: a markdown table."""
    columns = [summary_rows(run) for run in runs]
    header = ["figure", *(TITLES[run.breaker] for run in runs)]
    rows = [[title, *(c[i] for c in columns)] for i, title in enumerate(ROW_TITLES)]
    return report.table(header, rows)


def verdict(run: BreakerRun, probes: int) -> str:
    """Partitioner against its target: `probes` probes in every half-open period."""
    counts = [p.probes for r in run.rounds for p in r.periods if p.probes]
    over = sum(1 for n in counts if n > probes)
    exact = sum(1 for n in counts if n == probes)
    met = bool(counts) and exact == len(counts)
    return (
        f"Target for Partitioner: exactly {probes} probe(s) admitted in each half-open "
        f"period across all processes: {'met' if met else 'NOT met'} ({exact} of "
        f"{len(counts)} half-open periods exact, {over} over)."
    )


def print_report(runs: list[BreakerRun], args: Namespace) -> None:
    """The table and the conditions, as markdown, on stdout."""
    print(
        f"### Breakers: {args.processes} processes, {args.rounds} rounds of "
        f"{args.fail_s:g} s failing then {args.recover_s:g} s healthy; opens after "
        f"{args.threshold} consecutive failures, open {args.open_s:g} s, "
        f"{args.probes} probe(s); calls of {args.call_ms:g} ms, refused processes "
        f"retry after {args.poll_ms:g} ms\n"
    )
    print(summary(runs))
    part = next((run for run in runs if run.breaker == "partitioner"), None)
    if part is not None:
        print("\n" + verdict(part, args.probes))


def write_json(runs: list[BreakerRun], args: Namespace, argv: list[str], wall_s: float) -> None:
    """The run's figures and conditions, for the README to quote."""
    data: dict[str, Any] = runinfo.command("breakers", argv) | {
        "versions": _versions(args.breakers, args.redis),
        "machine": runinfo.machine(),
        "options": runinfo.options(args),
        "wall_s": round(wall_s, 1),
        "summary": {
            TITLES[run.breaker]: dict(zip(ROW_TITLES, summary_rows(run), strict=True))
            for run in runs
        },
        "breakers": {run.breaker: _run_json(run) for run in runs},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    log.info("results written to %s", args.output)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.monotonic()

    flush(args.redis)
    log.info("redis %s (flushed)", args.redis)
    try:
        runs = [run_breaker(breaker, args) for breaker in args.breakers]
    except BenchError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted; processes stopped")
        return 130

    wall_s = time.monotonic() - started
    print_report(runs, args)
    write_json(runs, args, argv, wall_s)
    log.info("wall time %.0f s", wall_s)
    return 0


def _start(
    processes: Sequence[BaseProcess],
    ready: Queue[int],
    go: Queue[Schedule],
    args: Namespace,
) -> Schedule:
    # Every process has built its breaker before the clock starts, so that the first
    # round does not measure imports and connections.
    try:
        for _ in processes:
            ready.get(timeout=READY_TIMEOUT_S)
    except queue.Empty:
        waited = f"{READY_TIMEOUT_S:.0f} s"
        raise BenchError(f"processes not ready within {waited}") from None
    start = time.time() + START_DELAY_S
    schedule = Schedule(start, args.rounds, args.fail_s, args.recover_s)
    for _ in processes:
        go.put(schedule)
    return schedule


def _join(processes: Sequence[BaseProcess], schedule: Schedule) -> None:
    deadline = schedule.end + JOIN_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.time()))
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise BenchError(f"processes {failed} failed or did not end; see above")


def _stop(processes: Sequence[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
        process.join()


def _recover_at(run: BreakerRun, at: float) -> float:
    schedule = run.schedule
    round_no = int((at - schedule.start) // schedule.round_s)
    return schedule.recover_at(round_no)


def _per_round(values: list[int]) -> str:
    return " / ".join(str(v) for v in values)


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")


def _versions(breakers: list[str], url: str) -> dict[str, str]:
    found = {
        "celery-partitioner": importlib.metadata.version("celery-partitioner"),
        "redis-py": redis.__version__,
        "python": platform.python_version(),
    }
    if "pybreaker" in breakers:
        found["pybreaker"] = importlib.metadata.version("pybreaker")
    with redis.Redis.from_url(url) as client, contextlib.suppress(redis.RedisError):
        found["redis-server"] = str(client.info("server")["redis_version"])
    return found


def _run_json(run: BreakerRun) -> dict[str, Any]:
    return {
        "schedule": asdict(run.schedule),
        "calls": run.calls,
        "rounds": [asdict(figures) for figures in run.rounds],
    }


if __name__ == "__main__":
    sys.exit(main())
