"""The "failing" scenario's targets, markdown tables and JSON results.

Every function takes the runs (`periods.Run`, one per layout) and the parsed options,
whose `breaker` holds payment's breaker settings as the run used them.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from typing import Any

from bench import periods, report, runinfo
from bench.measure import ServiceResult, measure
from bench.periods import Period, Phase, Recovery, Run, ServicePhase

HEALTHY = ("order", "inventory", "notification")
FAULTY = "payment"
TARGET_COMPLETED_PCT = 100.0
TARGET_P99_RATIO = 1.5
FULL_SHARE = 0.9  # of payment's send rate: its full throughput
RECOVERY_SLACK_S = 1.0  # the recovery target is open_s + this


def period_limit(args: Namespace) -> int:
    """The target: payment executions in one open period, at most."""
    return int(args.breaker["min_calls"]) + int(args.breaker["half_open_probes"])


def recovery_target_s(args: Namespace) -> float:
    return float(args.breaker["open_s"]) + RECOVERY_SLACK_S


def payment_phases(run: Run) -> list[ServicePhase]:
    return periods.per_phase(run, FAULTY)


def open_periods(run: Run) -> list[Period]:
    return periods.open_periods(run, FAULTY)


def recovery(run: Run, args: Namespace) -> Recovery:
    needed = periods.needed_per_window(args.rate, FULL_SHARE)
    return periods.recovery(run, FAULTY, run.phase("recovered").start, needed)


@dataclass(frozen=True)
class Verdict:
    """A healthy service without and with payment's fault, against the target."""

    service: str
    base: ServiceResult
    fault: ServiceResult
    rejected: int

    @property
    def p99_ratio(self) -> float | None:
        return report.ratio(self.fault.p99_ms, self.base.p99_ms)

    @property
    def met(self) -> bool:
        ratio = self.p99_ratio
        completed_pct = min(self.base.completed_pct, self.fault.completed_pct)
        if ratio is None or completed_pct < TARGET_COMPLETED_PCT or self.rejected:
            return False
        return ratio <= TARGET_P99_RATIO

    def as_dict(self) -> dict[str, Any]:
        ratio = self.p99_ratio
        return {
            "service": self.service,
            "no_fault": self.base.as_dict(),
            "fault": self.fault.as_dict(),
            "rejected": self.rejected,
            "p99_ratio": None if ratio is None else round(ratio, 2),
            "met": self.met,
        }


def verdicts(run: Run) -> list[Verdict]:
    """Each healthy service in the fault phase against the no-fault phase."""
    base, fault = run.phase("no fault"), run.phase("fault")
    found = []
    for service in HEALTHY:
        before, during = (_healthy(run, phase, service) for phase in (base, fault))
        rejected = (base.rejected + fault.rejected).count(service)
        found.append(Verdict(service, before, during, rejected))
    return found


def payment_table(run: Run) -> str:
    header = ["phase", "sent", "rejected at publish", "executed", "of which failed"]
    rows = [
        [f.phase, str(f.sent), str(f.rejected), str(f.executed), str(f.failed)]
        for f in payment_phases(run)
    ]
    return f"#### {run.title}: payment per phase\n\n{report.table(header, rows)}"


def periods_table(run: Run, args: Namespace) -> str:
    """The trip and the open periods, times in seconds from the fault's start."""
    origin = run.phase("fault").start
    found = open_periods(run)
    trip = periods.before_trip(run, FAULTY, origin)
    limit = period_limit(args)
    header = ["period", "from s", "to s", "ended by", "reason", "executions", "failed"]
    header.append(f"<= {limit}")
    tripped = _s(found[0].start - origin) if found else "-"
    rows = [["trip", _s(0.0), tripped, "open", "the fault starts",
             str(len(trip)), str(periods.failed(trip)), ""]]  # fmt: skip
    for p in found:
        rows.append([str(p.number), _s(p.start - origin), _s(p.end - origin), p.ended_by,
                     p.reason, str(p.executions), str(p.failed),
                     _yes(p.executions <= limit)])  # fmt: skip
    title = f"{run.title}: payment's open periods, s from the fault's start"
    return f"#### {title}\n\n{report.table(header, rows)}"


def healthy_table(runs: list[Run]) -> str:
    header = ["service", "layout", "completed no fault", "completed fault"]
    header += ["p99 fault/no fault", "rejected", "target met"]
    rows = [
        [v.service, run.key, report.completion(v.base), report.completion(v.fault),
         report.ratio_cell(v.fault, v.base), str(v.rejected), _yes(v.met)]
        for run in runs
        for v in verdicts(run)
    ]  # fmt: skip
    target = (
        f"Target: each healthy service completes {TARGET_COMPLETED_PCT:.0f} % of its "
        f"tasks and keeps p99 <= {TARGET_P99_RATIO:g}x its p99 without the fault."
    )
    title = "Healthy services, without and with payment's fault"
    return f"#### {title}\n\n{target}\n\n{report.table(header, rows)}"


def summary_rows(run: Run, args: Namespace) -> list[tuple[str, str]]:
    """One layout's headline figures, by name."""
    fault = next(f for f in payment_phases(run) if f.phase == "fault")
    found = open_periods(run)
    trip = periods.before_trip(run, FAULTY, run.phase("fault").start)
    back = recovery(run, args)
    most = max((p.executions for p in found), default=None)
    return [
        ("payment executed in the fault phase", f"{fault.executed} ({fault.failed} failed)"),
        ("payment rejected at publish in it", str(fault.rejected)),
        ("executions before the trip", str(len(trip)) if found else "-"),
        ("open periods", str(len(found))),
        (f"most executions in one period (<= {period_limit(args)})", _text(most)),
        ("open period left at recovery, s", _text(back.open_left_s)),
        ("recovery to closed, s", _text(back.closed_s)),
        ("recovery to first success after closed, s", _text(back.first_ok_s)),
        (f"recovery to full throughput, s (<= {recovery_target_s(args):g})",
         _text(back.full_s)),
        ("healthy services' target met", _yes(all(v.met for v in verdicts(run)))),
    ]  # fmt: skip


def summary(runs: list[Run], args: Namespace) -> str:
    columns = [dict(summary_rows(run, args)) for run in runs]
    rows = [[name, *(column[name] for column in columns)] for name in columns[0]]
    header = ["", *(run.key for run in runs)]
    return f"#### Summary\n\n{report.table(header, rows)}"


def conditions(args: Namespace) -> str:
    """The run's conditions and rules, in words."""
    settings = ", ".join(f"{k} {v}" for k, v in args.breaker.items())
    needed = periods.needed_per_window(args.rate, FULL_SHARE)
    return (
        f"{args.rate:g} tasks/s of {args.work_ms:g} ms to each service; payment's "
        f"dependency works for {args.before:g} s, fails every task for {args.fault:g} "
        f"s, then works for {args.after:g} s. Payment's breaker: {settings}. An "
        "execution counts where it ended (ledger done_at); full throughput: the first "
        f"1 s window with {needed} successful payment executions."
    )


def print_report(runs: list[Run], args: Namespace) -> None:
    """All tables, as markdown, on stdout."""
    print(f"### Failing partition: {conditions(args)}\n")
    for run in runs:
        print(payment_table(run) + "\n")
        if run.changes_of(FAULTY):
            print(periods_table(run, args) + "\n")
    print(healthy_table(runs) + "\n")
    print(summary(runs, args))


def write_json(runs: list[Run], args: Namespace, argv: list[str], wall_s: float) -> None:
    """The run's figures and conditions, for the README to quote."""
    data = runinfo.conditions("failing", argv, args) | {
        "conditions": conditions(args),
        "target": {
            "executions_per_open_period": period_limit(args),
            "completed_pct": TARGET_COMPLETED_PCT,
            "p99_ratio": TARGET_P99_RATIO,
            "recovery_s": recovery_target_s(args),
        },
        "wall_s": round(wall_s, 1),
        "layouts": {run.key: _run_json(run, args) for run in runs},
    }
    runinfo.write(args.output, data)


def _run_json(run: Run, args: Namespace) -> dict[str, Any]:
    origin = run.phase("fault").start
    return {
        "title": run.title,
        "ready_s": round(run.ready_s, 2),
        "phase_starts_s": {p.name: _relative(p.start, origin) for p in run.phases},
        "payment": [f.__dict__ for f in payment_phases(run)],
        "executions_before_trip": len(periods.before_trip(run, FAULTY, origin)),
        "open_periods": [p.as_dict(origin) for p in open_periods(run)],
        "recovery": recovery(run, args).__dict__,
        "healthy": [v.as_dict() for v in verdicts(run)],
        "transitions": [
            c.__dict__ | {"at": _relative(c.at, origin), "until": _relative(c.until, origin)}
            for c in run.changes
        ],
    }


def _healthy(run: Run, phase: Phase, service: str) -> ServiceResult:
    sent = [s for s in phase.sent if s.service == service]
    return measure(sent, run.ledger, phase.end + run.grace_s)[0]


def _relative(moment: float, origin: float) -> float | None:
    return round(moment - origin, 3) if moment else None


def _s(seconds: float) -> str:
    return f"{seconds:.2f}"


def _text(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else _s(value)


def _yes(met: bool) -> str:
    return "yes" if met else "NO"
