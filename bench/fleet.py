"""Worker fleets that a benchmark starts, waits for, settles between phases and stops.

A fleet is one or more commands (`celery worker`s, or one `partitioner launch`) that
bring up a known set of Celery nodes. Each command's output goes to a file so that the
benchmark's own output stays readable. Stopping always ends every process the fleet
started: SIGTERM (a warm shutdown) first, then SIGKILL for each whole process tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TypeVar

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from partitioner.launch import die_with_parent
from workers.faults import Fault, set_fault

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_INTERVAL_S = 0.5
PING_TIMEOUT_S = 1.0
READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
BROKER_ERRORS = (OSError, redis.RedisError, OperationalError)


class FleetError(RuntimeError):
    """A fleet did not start, settle or stop as expected."""


@dataclass(frozen=True)
class Command:
    """One process of a fleet: its command line and the file its output goes to."""

    argv: list[str]
    log_path: Path


@dataclass
class Fleet:
    """Worker commands, the Celery app that talks to them, the nodes they bring up."""

    title: str
    app: Celery
    nodes: tuple[str, ...]
    commands: tuple[Command, ...]
    env: dict[str, str]
    cwd: Path
    _started: list[tuple[Command, subprocess.Popen[bytes], IO[bytes]]] = field(
        default_factory=list, init=False, repr=False
    )

    @property
    def log_paths(self) -> str:
        """The commands' output files, for messages."""
        return ", ".join(str(command.log_path) for command in self.commands)

    def start(self) -> None:
        """Start each command in its own session, its output going to its `log_path`."""
        for command in self.commands:
            command.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = open(command.log_path, "ab")  # noqa: SIM115 - closed in stop()
            process = subprocess.Popen(
                command.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C reaches the benchmark only, which stops it.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            self._started.append((command, process, output))
            where = command.log_path
            log.info("%s: started pid %d, output in %s", self.title, process.pid, where)

    def wait_ready(self, timeout_s: float) -> float:
        """Wait until every node answers a ping; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        missing = set(self.nodes)
        dropped = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                replies = self.app.control.ping(
                    destination=list(self.nodes), timeout=PING_TIMEOUT_S
                )
            except BROKER_ERRORS as exc:
                # A dropped broker connection says nothing about the workers: ping
                # again until the deadline, and name the error if they never answer.
                dropped = f" (last ping failed: {exc})"
                continue
            missing = set(self.nodes) - {name for reply in replies for name in reply}
            if not missing:
                return time.monotonic() - started
        raise FleetError(
            f"{self.title}: nodes {sorted(missing)} did not answer within "
            f"{timeout_s:.0f} s{dropped}; see {self.log_paths}"
        )

    def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Purge the fleet's queues, then wait until no node reserves or runs a task."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.app.control.purge()
            if self.busy_tasks() == 0:
                return
            time.sleep(POLL_INTERVAL_S)
        raise FleetError(f"{self.title}: tasks still running after {timeout_s:.0f} s")

    def busy_tasks(self) -> int:
        """Tasks reserved or running on the nodes; -1 if a node did not answer."""
        control = self.app.control
        inspect = control.inspect(destination=list(self.nodes), timeout=PING_TIMEOUT_S)
        active = inspect.active() or {}
        reserved = inspect.reserved() or {}
        if set(active) != set(self.nodes) or set(reserved) != set(self.nodes):
            return -1
        return sum(len(tasks) for tasks in (*active.values(), *reserved.values()))

    def stop(self, timeout_s: float) -> None:
        """Warm shutdown, then SIGKILL to every process tree after `timeout_s`."""
        for _, process, _ in self._started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, process, output in self._started:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: up after %.0f s; killing it", self.title, timeout_s)
            _kill_tree(process.pid)
            process.wait()
            output.close()
        self._started.clear()

    def _check_alive(self) -> None:
        if not self._started:
            raise FleetError(f"{self.title}: not started")
        for command, process, _ in self._started:
            if process.poll() is not None:
                where = command.log_path
                raise FleetError(f"{self.title}: a command exited; see {where}")


def _kill_tree(pid: int) -> None:
    # The launcher starts each partition's worker in a session of its own, so killing
    # the process group is not enough: walk /proc for every descendant first.
    victims = [pid, *_descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _parent_of(proc_entry: Path) -> int | None:
    try:
        stat = (proc_entry / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; the fields after it are fixed.
    return int(stat.rsplit(")", 1)[1].split()[1])


@contextlib.contextmanager
def running(fleet: Fleet, key: str) -> Iterator[float]:
    """Start `fleet` and wait until its nodes answer; always stop it on the way out.

    Yields the seconds its nodes took to answer. `key` names the layout in the log.
    """
    try:
        fleet.start()
        ready_s = fleet.wait_ready(READY_TIMEOUT_S)
        log.info("%s: %s ready in %.1f s", key, ", ".join(fleet.nodes), ready_s)
        yield ready_s
    finally:
        fleet.stop(STOP_TIMEOUT_S)
        log.info("%s: workers stopped", key)


def run_in_workdir(scenario: str, keep_logs: bool, run: Callable[[Path], T]) -> T | int:
    """`run(workdir)` with SIGTERM acting as Ctrl-C; its result, or an exit code.

    The fleets `run` starts stop themselves on the way out. Their logs are kept when the
    run was interrupted (130) or a fleet failed (1), and with `keep_logs`.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{scenario}-"))
    log.info("worker logs in %s", workdir)
    try:
        result = run(workdir)
    except KeyboardInterrupt:
        log.warning("interrupted; workers stopped, logs kept in %s", workdir)
        return 130
    except FleetError as exc:
        log.error("%s; logs kept in %s", exc, workdir)
        return 1
    if not keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def reset_fault(service: str) -> None:
    """Put `service`'s dependency back to ok, as best it can: after an interruption
    mid-fault, failing or hanging tasks would hold up the fleet's warm shutdown."""
    with contextlib.suppress(redis.RedisError):
        set_fault(service, Fault())


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM stops the benchmark like Ctrl-C does, so that the fleets are stopped too.
    raise KeyboardInterrupt
