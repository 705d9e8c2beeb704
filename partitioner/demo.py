"""`partitioner demo`: the reference shop under steady traffic while one dependency hangs.

The demo starts an embedded server (unless a broker URL is set), launches the shop's four
partitions from `workers/` with `partitioner launch`, sends every service the same steady
traffic, and a third of the way in makes payment's dependency hang. A live table shows each
service's completions and latency, read from the shop's completion ledger; the summary says
whether the other three services noticed. It runs from the project folder, the one that holds
`workers/` and `config/partitioner.toml`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from celery import Celery
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from partitioner.app import Partitioner, attach
from partitioner.embedded import EmbeddedServer
from partitioner.errors import PartitionerError
from partitioner.launch import die_with_parent
from partitioner.settings import CONFIG_ENV, load_settings, mask_url

log = logging.getLogger(__name__)

CONFIG_FILE = Path("config") / "partitioner.toml"
TASKS = {
    "order": "shop.order.place",
    "payment": "shop.payment.charge",
    "inventory": "shop.inventory.reserve",
    "notification": "shop.notification.send",
}
FAULTY = "payment"
HANG_S = 5.0
RATE_PER_S = 8.0  # tasks a second, to each service
WORK_S = 0.02  # a task's normal duration
REFRESH_S = 0.25
PLAIN_EVERY_S = 5.0
RECENT_S = 10.0  # the live table's latencies are of tasks done this recently
DRAIN_S = 5.0
READY_TIMEOUT_S = 60.0
# A healthy service counts as unaffected if its p99 after the fault is within this factor,
# or this many ms, of before: a few ms of scheduling noise on a 20 ms task is not harm.
SLOWDOWN_LIMIT = 1.5
NOISE_MS = 20.0


class DemoError(PartitionerError):
    """The demo cannot run here, or the shop's workers did not come up."""


@dataclass
class Phase:
    """One service's tasks sent before, or after, the fault began."""

    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    waiting: dict[str, float] = field(default_factory=dict)  # task id -> sent_at, epoch s

    @property
    def done(self) -> int:
        return len(self.latencies_ms)

    def ages_ms(self, now: float) -> list[float]:
        return [(now - sent_at) * 1000 for sent_at in self.waiting.values()]

    def p99_ms(self, now: float) -> float | None:
        """The p99 latency; a task not done yet counts with its age so far."""
        return percentile(self.latencies_ms + self.ages_ms(now), 0.99)


@dataclass
class ServiceStats:
    """What one service was sent and has done, split at the fault."""

    name: str
    before: Phase = field(default_factory=Phase)
    after: Phase = field(default_factory=Phase)
    recent: list[tuple[float, float]] = field(default_factory=list)  # (done_at, latency_ms)

    @property
    def backlog(self) -> int:
        """Tasks sent and not done yet: waiting, reserved or running."""
        return len(self.before.waiting) + len(self.after.waiting)

    def finish(self, task_id: str, done_at: float) -> None:
        """Record a task done, if this run sent it."""
        phase = self.before if task_id in self.before.waiting else self.after
        if task_id in phase.waiting:
            latency_ms = (done_at - phase.waiting.pop(task_id)) * 1000
            phase.latencies_ms.append(latency_ms)
            self.recent.append((done_at, latency_ms))

    def row(self, now: float) -> tuple[str, str, str, str, str, str]:
        """Name, sent, done, backlog, and p50 and p99 in ms of the last RECENT_S."""
        self.recent = [(at, ms) for at, ms in self.recent if at >= now - RECENT_S]
        live = [ms for _, ms in self.recent] + self.before.ages_ms(now) + self.after.ages_ms(now)
        sent = self.before.sent + self.after.sent
        done = self.before.done + self.after.done
        p50, p99 = _ms(percentile(live, 0.5)), _ms(percentile(live, 0.99))
        return self.name, str(sent), str(done), str(self.backlog), p50, p99


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile `q` (0..1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def find_project(folder: Path) -> Path:
    """`folder` if it holds the shop (`workers/`, `config/partitioner.toml`), else an error."""
    missing = [str(p) for p in (Path("workers"), CONFIG_FILE) if not (folder / p).exists()]
    if missing:
        raise DemoError(
            f"{folder} has no {' or '.join(missing)}: run `partitioner demo` from the "
            "Partitioner project folder, the one that holds workers/ and config/"
        )
    return folder


class Demo:
    """One run: server, launcher, traffic, live table, summary and clean-up."""

    def __init__(self, project: Path, duration_s: float, state_dir: Path | None) -> None:
        self.project = project
        self.duration_s = duration_s
        self.settings, self.origins = load_settings(project / CONFIG_FILE)
        self.state_dir = (state_dir or self.settings.state_dir).resolve()
        self.console = Console(highlight=False, markup=False, soft_wrap=True)
        self.stats = {name: ServiceStats(name) for name in TASKS}
        self.warming: set[str] = set()  # ids of warm-up tasks, left out of the figures
        self.ledger_index = 0
        self.fault_at: float | None = None  # epoch seconds
        self.server: EmbeddedServer | None = None
        self.launcher: subprocess.Popen[bytes] | None = None
        self.producer: Partitioner | None = None
        self.live: Live | None = None
        self.next_plain_s = PLAIN_EVERY_S

    def run(self) -> None:
        """Run the whole demo; however it ends, Ctrl-C included, stop all it started."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._start()
            self._traffic()
            self._summary()
        except KeyboardInterrupt:
            self.console.print("interrupted: stopping the workers and the server")
            raise
        finally:
            self._clean_up()
            signal.signal(signal.SIGTERM, previous)

    def _start(self) -> None:
        url = self.settings.broker_url
        if url is None:
            self.server = EmbeddedServer.start(self.state_dir)
            url = self.server.url
        control_url = os.environ.get("WORKERS_CONTROL_URL") or url
        if not control_url.startswith(("redis://", "rediss://")):
            raise DemoError("the broker is not Redis: set WORKERS_CONTROL_URL=redis://...")
        # workers.control reads it here, and the launcher's workers inherit it.
        os.environ["WORKERS_CONTROL_URL"] = control_url
        self.console.print(f"broker {mask_url(url)}, state folder {self.state_dir}")

        app = Celery("partitioner-demo", set_as_current=False)
        settings = self.settings.model_copy(update={"broker_url": url})
        self.producer = attach(app, settings, self.origins)
        self._reset_shop()
        self.launcher = self._launch(url)
        self._wait_for_workers()
        self._warm_up()

    def _reset_shop(self) -> None:
        if str(self.project) not in sys.path:
            sys.path.insert(0, str(self.project))
        from workers import control, faults

        control.require_client().delete(control.LEDGER)
        for name in TASKS:
            faults.set_fault(name, faults.Fault())
        self._purge("an earlier run left")

    def _launch(self, url: str) -> subprocess.Popen[bytes]:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = os.environ | {
            CONFIG_ENV: str(self.project / CONFIG_FILE),
            "PARTITIONER_BROKER_URL": url,
        }
        command = [sys.executable, "-m", "partitioner", "launch", "--app", "workers.app:app"]
        with open(logs / "launcher.log", "ab") as output:
            launcher = subprocess.Popen(
                [*command, "--log-dir", str(logs)],
                cwd=self.project,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Only the demo hears Ctrl-C; it then sends the launcher a single SIGTERM.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.console.print(f"launching the shop's partitions (logs in {logs})")
        return launcher

    def _wait_for_workers(self) -> None:
        assert self.producer is not None
        wanted = {p.name for p in self.producer.topology.partitions}
        started = time.monotonic()
        while wanted and time.monotonic() - started < READY_TIMEOUT_S:
            self._check_launcher()
            replies = self.producer.app.control.ping(timeout=0.5) or []
            wanted -= {node.split("@", 1)[0] for reply in replies for node in reply}
        if wanted:
            raise DemoError(
                f"workers {', '.join(sorted(wanted))} did not answer within "
                f"{READY_TIMEOUT_S:.0f} s; see {self.state_dir / 'logs'}"
            )
        self.console.print(f"all workers answer ({time.monotonic() - started:.1f} s)")

    def _warm_up(self) -> None:
        # A pool process's first task opens its connections; keep that out of the figures.
        self._send_round(warm_up=True)
        deadline = time.monotonic() + READY_TIMEOUT_S / 4
        while self.warming and time.monotonic() < deadline:
            time.sleep(REFRESH_S / 5)
            self._collect()

    def _traffic(self) -> None:
        if self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False)
        with self.live or nullcontext():
            started = time.monotonic()
            next_send = next_show = started
            while (now := time.monotonic()) - started < self.duration_s:
                if now >= next_send:
                    # Switched just before a round of sends, so that no task of the round
                    # before, likely still running, reads the new fault.
                    if self.fault_at is None and now - started >= self.duration_s / 3:
                        self._hang_payment(now - started)
                    self._send_round()
                    next_send += 1 / RATE_PER_S
                if now >= next_show:
                    self._collect()
                    self._show(now - started)
                    next_show += REFRESH_S
                time.sleep(max(0.0, min(next_send, next_show) - time.monotonic()))

            healthy = [s for s in self.stats.values() if s.name != FAULTY]
            while any(s.backlog for s in healthy) and time.monotonic() - now < DRAIN_S:
                time.sleep(REFRESH_S)
                self._collect()
                self._show(time.monotonic() - started)

    def _hang_payment(self, elapsed_s: float) -> None:
        from workers import faults

        faults.set_fault(FAULTY, faults.Fault("hang", HANG_S))
        self.fault_at = time.time()
        message = (
            f"{elapsed_s:.0f} s: {FAULTY}'s dependency now hangs {HANG_S:g} s per call; "
            "its partition backs up, the others should not notice"
        )
        # A Text, not print(style=...): the style would also colour the live table.
        self.console.print(Text(message, style="bold yellow"))

    def _send_round(self, warm_up: bool = False) -> None:
        assert self.producer is not None
        for name, task in TASKS.items():
            sent_at = time.time()
            kwargs = {"sent_at": sent_at, "work_s": WORK_S}
            task_id = self.producer.app.send_task(task, kwargs=kwargs).id
            if warm_up:
                self.warming.add(task_id)
            else:
                stats = self.stats[name]
                phase = stats.before if self.fault_at is None else stats.after
                phase.sent += 1
                phase.waiting[task_id] = sent_at

    def _collect(self) -> None:
        from workers import control

        self._check_launcher()
        entries = control.read_ledger(control.require_client(), self.ledger_index)
        self.ledger_index += len(entries)
        for entry in entries:
            self.warming.discard(entry["id"])
            if entry["service"] in self.stats:
                self.stats[entry["service"]].finish(entry["id"], float(entry["done_at"]))

    def _show(self, elapsed_s: float) -> None:
        rows = [s.row(time.time()) for s in self.stats.values()]
        if self.live is not None:
            self.live.update(self._live_table(elapsed_s, rows), refresh=True)
        elif elapsed_s >= self.next_plain_s:
            self.next_plain_s += PLAIN_EVERY_S
            for name, sent, done, backlog, p50, p99 in rows:
                self.console.print(
                    f"{elapsed_s:4.0f} s  {name:<12}  sent {sent:>4}  done {done:>4}  "
                    f"backlog {backlog:>4}  p50 {p50:>5} ms  p99 {p99:>5} ms"
                )

    def _live_table(self, elapsed_s: float, rows: Sequence[tuple[str, ...]]) -> Table:
        table = Table(
            title=f"Partitioner demo: {min(elapsed_s, self.duration_s):.0f} s "
            f"of {self.duration_s:g} s",
            caption=f"latency of tasks done in the last {RECENT_S:g} s or still waiting",
        )
        for header in ("service", "sent", "done", "backlog", "p50 ms", "p99 ms"):
            table.add_column(header, justify="left" if header == "service" else "right")
        for row in rows:
            hurt = row[0] == FAULTY and self.fault_at is not None
            table.add_row(*row, style="red" if hurt else None)
        return table

    def _check_launcher(self) -> None:
        if self.launcher is not None and self.launcher.poll() is not None:
            raise DemoError(
                f"the launcher exited with code {self.launcher.returncode}; see "
                f"{self.state_dir / 'logs' / 'launcher.log'}"
            )

    def _summary(self) -> None:
        table = Table(
            title="Summary",
            caption="a task not done yet counts in p99 with its age so far",
            box=box.SIMPLE,
        )
        table.add_column("service")
        for when in ("before", "after"):
            for what in ("sent", "done", "p99 ms"):
                table.add_column(f"{what}\n{when}", justify="right")
        for s in self.stats.values():
            phases = (s.before, s.after)
            cells = [(str(p.sent), str(p.done), _ms(p.p99_ms(time.time()))) for p in phases]
            table.add_row(s.name, *cells[0], *cells[1])
        self.console.print(table)
        self.console.print(verdict(list(self.stats.values())))

    def _clean_up(self) -> None:
        # A Ctrl-C or SIGTERM during clean-up turns the launcher's warm shutdown cold
        # instead of abandoning it: no worker may outlive the demo.
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._hurry) for sig in stops}
        try:
            if self.launcher is not None and self.launcher.poll() is None:
                self.console.print("stopping the workers (warm shutdown)")
                self.launcher.send_signal(signal.SIGTERM)
                try:
                    self.launcher.wait(self.settings.shutdown_timeout_s + 30)
                except subprocess.TimeoutExpired:
                    self.launcher.kill()
                    self.launcher.wait()
            if self.producer is not None:
                self._tidy_shop()
        finally:
            if self.producer is not None and self.producer.view is not None:
                self.producer.view.stop()  # it would report the stopped server as unreachable
            if self.server is not None:
                self.server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _hurry(self, signum: int, frame: FrameType | None) -> None:
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGTERM)

    def _tidy_shop(self) -> None:
        from workers import faults

        try:
            faults.set_fault(FAULTY, faults.Fault())
            self._purge(f"{FAULTY} still had waiting")
        except Exception as exc:  # the broker may be gone; a later run resets it anyway
            log.warning("could not reset the shop's fault switches and queues: %s", exc)

    def _purge(self, why: str) -> None:
        assert self.producer is not None
        purged = self.producer.app.control.purge()
        if purged:
            self.console.print(f"dropped {purged} demo task(s) {why}")


def verdict(stats: list[ServiceStats]) -> str:
    """One sentence: were the healthy services unaffected while the faulty one backed up?"""
    healthy = [s for s in stats if s.name != FAULTY]
    hurt = [s.name for s in healthy if not _unaffected(s)]
    faulty = next(s for s in stats if s.name == FAULTY)
    sent = faulty.before.sent + faulty.after.sent
    backed_up = f"{FAULTY} backed up ({faulty.backlog} of its {sent} tasks not done)"
    if hurt:
        return f"Isolation did not hold for {', '.join(hurt)}; meanwhile {backed_up}."
    return (
        f"{', '.join(s.name for s in healthy)} were unaffected (every task done, p99 within "
        f"{SLOWDOWN_LIMIT:g}x or {NOISE_MS:g} ms of before the fault), while {backed_up}."
    )


def _unaffected(s: ServiceStats) -> bool:
    before = percentile(s.before.latencies_ms, 0.99)
    after = percentile(s.after.latencies_ms, 0.99)
    if s.backlog or before is None or after is None:
        return False
    return after <= max(SLOWDOWN_LIMIT * before, before + NOISE_MS)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up the same way as Ctrl-C


def run_demo(duration_s: float, state_dir: Path | None) -> None:
    """Run the demo from the current folder, which must be the project folder."""
    Demo(find_project(Path.cwd()), duration_s, state_dir).run()
