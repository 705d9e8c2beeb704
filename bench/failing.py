"""Scenario "failing": how many tasks run against a failing dependency, and what it
costs the other partitions and payment's recovery.

Two layouts of the reference shop run one after the other, each on the Redis database
flushed just before it: `partitioner launch` with `config/partitioner.toml` (a
partition of concurrency 1 per service, budget 4), with payment's breaker

- on ("breaker"): a count window of the last 20 calls, opening at a failure rate of
  50 % once 10 calls are in it, open for 2 s with no back-off (`open_backoff` 1, so
  every open period lasts `open_s`), 3 probes in half-open, and `on_open` = reject:
  the producer gate raises `PartitionOpen` at publish and the client drops the task;
- off ("no-breaker"): `PARTITIONER_PARTITIONS__PAYMENT__BREAKER__ENABLED=false`.

Payment's breaker settings reach the workers and the benchmark's own app as
`PARTITIONER_PARTITIONS__PAYMENT__BREAKER__*` variables; the other partitions keep the
settings file's. Steady traffic of 20 ms tasks, 10 a second to each of the four
services, runs through three phases without a pause: 10 s with no fault ("no fault"),
20 s in which payment's dependency fails every task ("fault", fault `fail`), 10 s
after it recovers ("recovered", fault `ok`).

Measured, from the shop's completion ledger and the transitions published on the
breaker channel `partitioner:<settings name>:breaker:db<N>` (subscribed to before the
traffic starts). An execution is a ledger entry: a task that ran, failed or not; it
counts in the period or phase in which it ended (its `done_at`).

1. Payment's executions per open period, which runs from a transition to `open` to the
   next transition to `closed` or `open`. Target: at most `min_calls` +
   `half_open_probes` (13) in every period. Also the executions from the fault's start
   to the first `open` (the trip), and payment's figures per phase in both layouts.
2. Each healthy service's tasks completed within their phase (its traffic window plus
   a 1 s grace) and the p99 of `done_at - sent_at`, without and with payment's fault.
   Target: 100 % completed and p99 at most 1.5x its p99 without the fault.
3. Seconds from the dependency's recovery to full payment throughput: the start of
   the first 1 s window, beginning at a successful payment execution, that holds
   successful executions for 90 % of payment's send rate (9 at 10 a second). Target:
   at most `open_s` + 1 s. Also the seconds to the `closed` transition and to the
   first successful execution after it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from argparse import Namespace
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench import failing_report, layouts, options, traffic
from bench.failing_report import FAULTY, HEALTHY
from bench.fleet import Fleet, reset_fault, run_in_workdir
from bench.isolation import flush_broker
from bench.options import Option
from bench.periods import Change, Phase, Run
from bench.traffic import Sent
from partitioner import PartitionerError, load_settings
from partitioner.app import partitioner_of
from partitioner.errors import PartitionOpen
from partitioner.topology import Topology
from workers import control
from workers.faults import Fault, set_fault

log = logging.getLogger("bench.failing")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
CONFIG_REL = Path("config") / "partitioner.toml"
OUTPUT_REL = Path("bench") / "results" / "failing.json"
BREAKER_ENV = f"PARTITIONER_PARTITIONS__{FAULTY.upper()}__BREAKER__"
MIN_CALLS = 10
PROBES = 3
# Payment's breaker; the options add open_s, open_backoff and on_open.
BREAKER: dict[str, Any] = {
    "window": "count",
    "window_calls": 20,
    "min_calls": MIN_CALLS,
    "failure_rate": 0.5,
    "half_open_probes": PROBES,
}
LAYOUTS = {"breaker": True, "no-breaker": False}  # layout: payment's breaker enabled
READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LISTEN_TICK_S = 0.2

OPTIONS: list[Option] = [
    ("--broker", str, DEFAULT_BROKER_URL, "Redis URL; the database is FLUSHED"),
    ("--before", float, 10.0, "seconds of traffic before the fault"),
    ("--fault", float, 20.0, "seconds in which payment's dependency fails"),
    ("--after", float, 10.0, "seconds of traffic after it recovers"),
    ("--rate", float, 10.0, "tasks a second to each service"),
    ("--work-ms", float, 20.0, "milliseconds one task works"),
    ("--open-s", float, 2.0, "payment breaker's open_s"),
    ("--open-backoff", float, 1.0, "payment breaker's open_backoff"),
    ("--grace", float, 1.0, "seconds after a phase's window a task may still end"),
    ("--warmup", float, 2.0, "seconds of unmeasured traffic before the phases"),
    ("--layouts", str, "breaker,no-breaker", "comma-separated layouts to run"),
    ("--loglevel", str, "info", "workers' log level (their output goes to files)"),
]

EPILOG = """\
example:
  scripts/bench failing                          # the full run, about 2 minutes
  python -m bench.failing --fault 10 --layouts breaker --on-open park
"""


def parse_args(argv: list[str] | None) -> Namespace:
    parser = options.parser("failing", __doc__, EPILOG, OPTIONS)
    add = parser.add_argument
    on_open = "payment breaker's on_open (%(default)s)"
    add("--on-open", choices=("reject", "park"), default="reject", help=on_open)
    add("--config", type=Path, help=f"Partitioner settings ({CONFIG_REL})")
    add("--output", type=Path, help=f"JSON results file ({OUTPUT_REL})")
    add("--keep-logs", action="store_true", help="keep the workers' log files")
    args = parser.parse_args(argv)

    use = "breaker, no-breaker or both"
    chosen = options.chosen(parser, "--layouts", args.layouts, LAYOUTS, use)
    options.require_redis(parser, args.broker, "the ledger lives on the broker")
    args.layouts = chosen
    args.config = args.config or layouts.REPO_ROOT / CONFIG_REL
    args.output = args.output or layouts.REPO_ROOT / OUTPUT_REL
    args.breaker = breaker_settings(args)
    # The settings as each layout runs them, payment's breaker variables set.
    for enabled in {LAYOUTS[key] for key in chosen}:
        os.environ.update(breaker_env(args, enabled))
        try:
            Topology.from_settings(*load_settings(args.config))
        except PartitionerError as exc:
            parser.error(f"--config {args.config}, payment's breaker as chosen: {exc}")
    return args


def breaker_settings(args: Namespace) -> dict[str, Any]:
    """Payment's breaker settings in this run, as in the settings file."""
    chosen = {"open_s": args.open_s, "open_backoff": args.open_backoff}
    return BREAKER | chosen | {"on_open": args.on_open}


def breaker_env(args: Namespace, enabled: bool) -> dict[str, str]:
    """The variables that set payment's breaker, in the workers and in this process."""
    values = breaker_settings(args) | {"enabled": enabled}
    return {BREAKER_ENV + key.upper(): _env_value(v) for key, v in values.items()}


class TransitionLog:
    """Every breaker transition published on `channel` while it listens."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.changes: list[Change] = []
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Subscribe now, then collect in a thread of its own."""
        pubsub = self.client.pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True
        )
        pubsub.subscribe(self.channel)
        self._thread = threading.Thread(target=self._listen, args=(pubsub,))
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> list[Change]:
        """Stop listening; the transitions heard, in order."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        return self.changes

    def _listen(self, pubsub: Any) -> None:
        try:
            while not self._stopped.is_set():
                message = pubsub.get_message(timeout=LISTEN_TICK_S)
                if message is not None:
                    event = json.loads(message["data"])
                    self.changes.append(Change.from_event(event))
        finally:
            pubsub.close()


@dataclass
class Rejecting:
    """Sends like `traffic.send`; logs instead a task the producer gate rejected."""

    rejected: list[str] = field(default_factory=list)  # the rejected tasks' services

    def __call__(self, app: Celery, service: str, number: int, work_s: float) -> Sent | None:
        try:
            return traffic.send(app, service, number, work_s)
        except PartitionOpen:
            self.rejected.append(service)
            return None


def plan(args: Namespace) -> list[tuple[str, Fault, float]]:
    """The phases: name, payment's fault and seconds of traffic."""
    return [
        ("no fault", Fault(), args.before),
        ("fault", Fault("fail"), args.fault),
        ("recovered", Fault(), args.after),
    ]


def run_phases(app: Celery, args: Namespace) -> list[Phase]:
    """The phases back to back, payment's fault switched as each starts."""
    services = (*HEALTHY, FAULTY)
    work_s = args.work_ms / 1000.0
    phases = []
    for name, fault, duration_s in plan(args):
        set_fault(FAULTY, fault)
        start = time.time()
        log.info("phase %r: payment's dependency %s for %.0f s", name, fault, duration_s)
        sender = Rejecting()
        sent = traffic.steady(app, services, args.rate, duration_s, work_s, sender)
        phases.append(Phase(name, start, start + duration_s, sent, sender.rejected))
    time.sleep(args.grace + LISTEN_TICK_S)
    return phases


def warm_up(fleet: Fleet, args: Namespace) -> None:
    """Unmeasured traffic to every service, so that no phase pays for first calls."""
    if args.warmup > 0:
        services = (*HEALTHY, FAULTY)
        work_s = args.work_ms / 1000.0
        traffic.steady(fleet.app, services, args.rate, args.warmup, work_s)
    fleet.settle(SETTLE_TIMEOUT_S)


def build_fleet(key: str, args: Namespace, workdir: Path) -> Fleet:
    """`partitioner launch` with payment's breaker on or off, and an app to match."""
    os.environ.update(breaker_env(args, LAYOUTS[key]))
    token = layouts.unique_token()
    fleet = layouts.partitioner_fleet(workdir / key, token, args.loglevel)
    title = f"Partitioner, payment's breaker {'on' if LAYOUTS[key] else 'off'}"
    return replace(fleet, app=layouts.partitioner_app(args.config), title=title)


def run_layout(key: str, args: Namespace, workdir: Path) -> Run:
    """Start one layout's fleet, run the phases on it, and always stop it."""
    flush_broker(args.broker)
    fleet = build_fleet(key, args, workdir)
    run = Run(key, fleet.title, args.grace)
    partitioner = partitioner_of(fleet.app)
    assert partitioner.view is not None, "payment's breaker needs a Redis store"
    channel = partitioner.view.channel
    listener = TransitionLog(control.require_client(), channel)
    try:
        fleet.start()
        run.ready_s = fleet.wait_ready(READY_TIMEOUT_S)
        log.info("%s: %s ready in %.1f s", key, ", ".join(fleet.nodes), run.ready_s)
        warm_up(fleet, args)
        control.require_client().delete(control.LEDGER)
        listener.start()
        run.phases = run_phases(fleet.app, args)
    finally:
        run.changes = listener.stop()
        if partitioner.view is not None:
            partitioner.view.stop()
        reset_fault(FAULTY)
        fleet.stop(STOP_TIMEOUT_S)
        log.info("%s: workers stopped", key)
    run.ledger = control.read_ledger(control.require_client())
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.monotonic()

    os.environ.update(layouts.environment(args.broker, args.config))
    log.info("broker %s (flushed before each layout)", args.broker)
    runs = run_in_workdir(
        "failing",
        args.keep_logs,
        lambda workdir: [run_layout(key, args, workdir) for key in args.layouts],
    )
    if isinstance(runs, int):
        return runs

    wall_s = time.monotonic() - started
    failing_report.print_report(runs, args)
    failing_report.write_json(runs, args, argv, wall_s)
    log.info("wall time %.0f s", wall_s)
    return 0


def _env_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


if __name__ == "__main__":
    sys.exit(main())
