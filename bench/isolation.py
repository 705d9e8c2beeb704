"""Scenario "isolation": does one service's hanging dependency starve the others?

Two layouts of the reference shop run one after the other on one Redis database:

- stock Celery: one shared queue and one worker with a prefork pool of 4 processes;
- Partitioner: `partitioner launch` with `config/partitioner.toml` (a partition of
  concurrency 1 per service, budget 4).

A third, "supervised", runs when `--layouts` names it: `partitioner launch` with the
supervisor on, breakers off, budget 4, and limits that keep a process for each healthy
service whatever payment's backlog (order, inventory and notification `min = 1`,
`max = 2`; payment `min = 0`, `max = 2`), so that payment may use only the process the
budget has left. It is judged against the same target.

Each layout runs two phases, after a short unmeasured warm-up:

- no fault: steady 20 ms tasks to order, inventory and notification, 10 a second
  each, for 15 s;
- fault: payment's dependency hangs (every payment task blocks 5 s) and a burst of 100
  payment tasks arrives, then the same steady traffic runs.

Per service it measures, from the shop's completion ledger, the tasks completed within
the window (the 15 s of traffic plus a 1 s grace) out of those sent, and the p50 and
p99 of `done_at - sent_at`. Partitioner's target: under the fault, each healthy
service completes 100 % of its tasks and keeps its p99 at most 1.5x its p99 without.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import layouts, options, report, runinfo
from bench.fleet import Fleet, reset_fault, run_in_workdir, running
from bench.measure import ServiceResult, measure
from bench.options import Option
from bench.traffic import Sent, burst, steady
from partitioner import PartitionerError, load_settings
from partitioner.topology import Topology
from workers import control
from workers.faults import Fault, set_fault

log = logging.getLogger("bench.isolation")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/12"
# Relative to the repository's root when not given; given paths are relative to the cwd.
CONFIG_REL = Path("config") / "partitioner.toml"
OUTPUT_REL = Path("bench") / "results" / "isolation.json"
HEALTHY = ("order", "inventory", "notification")
FAULTY = "payment"
TARGET_COMPLETED_PCT = 100.0
TARGET_P99_RATIO = 1.5
PHASES = ("no fault", "fault")
# The layouts judged against the target, and the key of each one's verdicts in the JSON.
PARTITIONER_LAYOUTS = {"partitioner": "summary", "supervised": "summary_supervised"}

OPTIONS: list[Option] = [
    ("--broker", str, DEFAULT_BROKER_URL, "Redis URL; the database is FLUSHED first"),
    ("--duration", float, 15.0, "seconds of steady traffic per phase"),
    ("--rate", float, 10.0, "tasks a second to each healthy service"),
    ("--work-ms", float, 20.0, "milliseconds one healthy task works"),
    ("--burst", int, 100, "payment tasks sent as the fault starts"),
    ("--hang", float, 5.0, "seconds each payment task blocks under the fault"),
    ("--grace", float, 1.0, "seconds after the window a task may still end"),
    ("--warmup", float, 2.0, "seconds of unmeasured traffic before the phases"),
    ("--layouts", str, "stock,partitioner", "stock, partitioner and/or supervised"),
    ("--loglevel", str, "info", "workers' log level (their output goes to files)"),
]

EPILOG = """\
example:
  scripts/bench                                  # the full run, about 1.5 minutes
  python -m bench.isolation --duration 5 --layouts partitioner
  python -m bench.isolation --layouts stock,partitioner,supervised
"""


@dataclass
class LayoutResult:
    """One layout's figures: how long its workers took to answer, and each phase."""

    key: str
    title: str
    ready_s: float = 0.0
    phases: dict[str, list[ServiceResult]] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> Namespace:
    parser = options.parser("isolation", __doc__, EPILOG, OPTIONS)
    add = parser.add_argument
    add("--config", type=Path, help=f"Partitioner settings ({CONFIG_REL})")
    add("--output", type=Path, help=f"JSON results file ({OUTPUT_REL})")
    add("--keep-logs", action="store_true", help="keep the workers' log files")
    args = parser.parse_args(argv)

    known, use = layouts.LAYOUTS, "any of stock, partitioner and supervised"
    args.layouts = options.chosen(parser, "--layouts", args.layouts, known, use)
    options.require_redis(parser, args.broker, "the ledger lives on the broker")
    args.config = args.config or layouts.REPO_ROOT / CONFIG_REL
    args.output = args.output or layouts.REPO_ROOT / OUTPUT_REL
    try:
        Topology.from_settings(*load_settings(args.config))
    except PartitionerError as exc:
        parser.error(f"--config {args.config}: {exc}")
    return args


def run_phase(fleet: Fleet, args: Namespace, fault: bool) -> list[ServiceResult]:
    """One phase of traffic on a ready, idle fleet; returns the figures per service."""
    store = control.require_client()
    store.delete(control.LEDGER)
    work_s = args.work_ms / 1000.0

    sent: list[Sent] = []
    if fault:
        set_fault(FAULTY, Fault("hang", args.hang))
        sent += burst(fleet.app, FAULTY, args.burst, work_s)
    window_start = time.time()
    sent += steady(fleet.app, HEALTHY, args.rate, args.duration, work_s)

    deadline = window_start + args.duration + args.grace
    time.sleep(max(0.0, deadline - time.time()) + 0.2)
    results = measure(sent, control.read_ledger(store), deadline)

    set_fault(FAULTY, Fault())
    fleet.settle()
    return results


def warm_up(fleet: Fleet, args: Namespace) -> None:
    """Unmeasured traffic to every service, so that no phase pays for first calls."""
    if args.warmup > 0:
        services = (*HEALTHY, FAULTY)
        steady(fleet.app, services, args.rate, args.warmup, args.work_ms / 1000.0)
    fleet.settle()


def run_layout(key: str, args: Namespace, workdir: Path, token: str) -> LayoutResult:
    """Start one layout's fleet, run both phases on it, and always stop it."""
    fleet = layouts.LAYOUTS[key](workdir, token, args.loglevel)
    result = LayoutResult(key, fleet.title)
    with running(fleet, key) as ready_s:
        result.ready_s = ready_s
        try:
            warm_up(fleet, args)
            for phase in PHASES:
                log.info("%s: phase %r, %.0f s of traffic", key, phase, args.duration)
                result.phases[phase] = run_phase(fleet, args, fault=phase == "fault")
        finally:
            reset_fault(FAULTY)
    return result


def flush_broker(url: str) -> None:
    """Empty the benchmark's database: queues, ledger and faults of earlier runs."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass(frozen=True)
class Verdict:
    """One healthy service under the fault: Partitioner against the target."""

    service: str
    fault: ServiceResult
    base: ServiceResult
    p99_ratio: float | None
    met: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the JSON results."""
        ratio = None if self.p99_ratio is None else round(self.p99_ratio, 2)
        return {
            "service": self.service,
            "completed_pct": round(self.fault.completed_pct, 1),
            "p99_fault_ms": self.fault.p99_ms,
            "p99_no_fault_ms": self.base.p99_ms,
            "p99_ratio": ratio,
            "met": self.met,
        }


def verdicts(result: LayoutResult) -> list[Verdict]:
    """Each healthy service's figures under the fault against those without it."""
    found = []
    for service in HEALTHY:
        base, fault = (_find(result, phase, service) for phase in PHASES)
        ratio = report.ratio(fault.p99_ms, base.p99_ms)
        met = fault.completed_pct >= TARGET_COMPLETED_PCT and (
            ratio is not None and ratio <= TARGET_P99_RATIO
        )
        found.append(Verdict(service, fault, base, ratio, met))
    return found


def summary(stock: LayoutResult | None, part: LayoutResult | None) -> str:
    """A Partitioner layout against the target, the shared pool beside it: markdown."""
    if part is None:
        return "(no summary: the Partitioner layout was not run)"
    header = ["service", "Partitioner completed", "Partitioner p99 fault/no fault"]
    header.append("target met")
    rows = [
        [
            v.service,
            report.completion(v.fault),
            report.ratio_cell(v.fault, v.base),
            "yes" if v.met else "NO",
        ]
        for v in verdicts(part)
    ]
    if stock is not None:
        header += ["shared pool completed", "shared pool p99 fault/no fault"]
        for row, v in zip(rows, verdicts(stock), strict=True):
            row += [report.completion(v.fault), report.ratio_cell(v.fault, v.base)]
    target = (
        f"Target for Partitioner under payment's fault: each healthy service completes "
        f"{TARGET_COMPLETED_PCT:.0f} % of its tasks and keeps p99 <= "
        f"{TARGET_P99_RATIO:g}x its p99 without the fault."
    )
    return f"#### Summary: {part.title}\n\n{target}\n\n{report.table(header, rows)}"


def print_report(results: dict[str, LayoutResult], args: Namespace) -> None:
    """All tables, as markdown, on stdout."""
    print(f"### Isolation: {completion_rule(args)}\n")
    for result in results.values():
        for phase, figures in result.phases.items():
            print(report.phase_table(f"{result.title}: {phase}", figures) + "\n")
    judged = [key for key in PARTITIONER_LAYOUTS if key in results] or ["partitioner"]
    print("\n\n".join(summary(results.get("stock"), results.get(key)) for key in judged))


def completion_rule(args: Namespace) -> str:
    """How a task is counted as completed, in words."""
    return (
        f"a task counts as completed when it ended successfully within the "
        f"{args.duration:g} s traffic window + {args.grace:g} s grace; "
        f"latency is done_at - sent_at; '{report.NOT_DONE}': that percentile's tasks "
        "had not completed"
    )


def write_json(
    results: dict[str, LayoutResult], args: Namespace, argv: list[str], wall_s: float
) -> None:
    """The run's figures and conditions, for the README to quote."""
    data: dict[str, Any] = runinfo.command("isolation", argv) | {
        "versions": runinfo.versions(),
        "machine": runinfo.machine(),
        "options": runinfo.options(args),
        "completion_rule": completion_rule(args),
        "target": {
            "completed_pct": TARGET_COMPLETED_PCT,
            "p99_ratio": TARGET_P99_RATIO,
        },
        "wall_s": round(wall_s, 1),
        "layouts": {key: _layout_json(result) for key, result in results.items()},
    }
    for key, name in PARTITIONER_LAYOUTS.items():
        if key in results:
            data[name] = [v.as_dict() for v in verdicts(results[key])]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    log.info("results written to %s", args.output)


def run_all(args: Namespace, workdir: Path) -> dict[str, LayoutResult]:
    """Every chosen layout in turn, each fleet started and stopped in its turn."""
    token = layouts.unique_token()
    return {key: run_layout(key, args, workdir, token) for key in args.layouts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.monotonic()

    os.environ.update(layouts.environment(args.broker, args.config))
    flush_broker(args.broker)
    log.info("broker %s (flushed)", args.broker)
    results = run_in_workdir("isolation", args.keep_logs, lambda workdir: run_all(args, workdir))
    if isinstance(results, int):
        return results

    wall_s = time.monotonic() - started
    print_report(results, args)
    write_json(results, args, argv, wall_s)
    log.info("wall time %.0f s", wall_s)
    return 0


def _find(result: LayoutResult, phase: str, service: str) -> ServiceResult:
    return next(r for r in result.phases[phase] if r.service == service)


def _layout_json(result: LayoutResult) -> dict[str, Any]:
    return {
        "title": result.title,
        "ready_s": round(result.ready_s, 2),
        "phases": {
            phase: [figure.as_dict() for figure in figures]
            for phase, figures in result.phases.items()
        },
    }


if __name__ == "__main__":
    sys.exit(main())
