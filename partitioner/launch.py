"""Launching partitioned workers: one Celery worker process per partition, kept alive.

Each partition gets an ordinary `celery worker` process named `<partition>@<host>` that
consumes only the partition's queues, with the partition's pool type, starting at its
`concurrency`. The launcher restarts a worker that dies, with a growing delay, and leaves
the others alone; a partition whose worker keeps dying is marked degraded. Every
`supervisor.interval_s` it runs the supervisor's step and applies this host's part of the
plan: prefork pools are resized in place, other pools are drained and restarted at their new
size. On SIGHUP, or when the settings file changes, it applies new limits (see
`partitioner.supervisor.live`). On SIGTERM or Ctrl-C it asks every worker for a warm shutdown
(running tasks finish, reserved ones go back to the broker) and only after
`shutdown_timeout_s` turns it into a cold one.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from celery import Celery

from partitioner.app import WORKER_ENV, Partitioner, partitioner_of, unacked_keys
from partitioner.embedded import EmbeddedServer
from partitioner.errors import BrokerError, LaunchError, PartitionerError
from partitioner.observe import BROKER_TIMEOUT_S, connection_errors, unreachable
from partitioner.settings import CONFIG_ENV, config_path, mask_url
from partitioner.supervisor import live
from partitioner.supervisor.loop import Pools, Supervisor, record_for
from partitioner.supervisor.pool import TARGET_ENV, send_targets
from partitioner.topology import Partition

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 30.0
# A worker that ran this long before dying is restarted at once, not after a longer delay.
STABLE_AFTER_S = 30.0
POLL_INTERVAL_S = 0.2
# How long a resize waits for the reply of a worker that has not answered yet.
NEW_WORKER_REPLY_S = 0.05
KILL_AFTER_S = 10.0
PR_SET_PDEATHSIG = 1


def load_app(spec: str) -> Celery:
    """Import `MODULE:ATTR` (or `MODULE`, which must hold `app`) from the current folder."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise LaunchError(f"--app {spec!r} is not of the form MODULE:ATTR, e.g. workers.app:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise LaunchError(
            f"--app {spec!r}: module {exc.name!r} not found; run from the folder that holds "
            "it, or put it on PYTHONPATH"
        ) from None
    except PartitionerError:
        raise
    except Exception as exc:
        raise LaunchError(f"--app {spec!r}: importing {module_name!r} failed: {exc!r}") from exc
    app = getattr(module, attr or "app", None)
    if not isinstance(app, Celery):
        raise LaunchError(f"--app {spec!r}: {module_name}.{attr or 'app'} is not a Celery app")
    return app


def give_back_unacked(partitioner: Partitioner, worker: str) -> int:
    """Requeue the tasks a dead Redis worker had fetched and not acknowledged.

    Raises `BrokerError` when the broker cannot be reached.
    """
    if not partitioner.broker_is_redis:
        return 0  # AMQP brokers requeue a dead consumer's messages by themselves.
    app = partitioner.app
    options = unacked_keys(worker)
    try:
        with app.connection_for_write(transport_options=options) as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            channel = connection.default_channel
            tags = channel.client.hkeys(options["unacked_key"])
            for tag in tags:
                channel.qos.restore_by_tag(tag)
    except connection_errors(app) as exc:
        raise unreachable(app, exc) from exc
    return len(tags)


@dataclass
class WorkerProcess:
    """One partition's worker on this host, and its restart bookkeeping."""

    partition: Partition
    name: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    restarts: int = 0
    log_file: IO[bytes] | None = field(default=None, repr=False)
    size: int = 0  # the --concurrency it runs with
    target: int = 0  # the size the supervisor wants
    resize_to: int | None = None  # draining, to restart at this size
    degraded: bool = False
    pool: dict[str, Any] | None = None  # its last answer to a resize
    planned_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def resizable(self) -> bool:
        """Prefork pools grow and shrink in place; threads and solo are restarted."""
        return self.partition.pool == "prefork"

    def settled(self) -> bool:
        """True when its last answer says the pool runs at `target`, nothing draining."""
        pool = self.pool
        return (
            pool is not None
            and pool["target"] == self.target
            and pool["slots"] == self.target
            and not pool["draining"]
        )


class Launcher:
    """Starts and keeps alive one worker per partition, in the foreground."""

    def __init__(
        self,
        app_spec: str,
        partitioner: Partitioner,
        host: str | None = None,
        loglevel: str = "info",
        log_dir: Path | None = None,
    ) -> None:
        self.app_spec = app_spec
        self.partitioner = partitioner
        self.host = host or socket.gethostname()
        self.loglevel = loglevel
        self.log_dir = log_dir
        self.workers = [
            WorkerProcess(
                p, p.worker_name(self.host), target=p.concurrency, planned_at=time.monotonic()
            )
            for p in partitioner.topology.partitions
        ]
        self.server: EmbeddedServer | None = None
        self.supervisor: Supervisor | None = None
        self.config = config_path()
        self._config_seen = _modified(self.config)
        self._reload_asked = False
        self._next_step = 0.0
        self._failing: set[str] = set()
        self._stopping = 0

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit code."""
        self._install_signals()
        try:
            self._ensure_broker()
            for worker in self.workers:
                self._start(worker)
            while not self._stopping:
                self._tend()
                self._guarded(self._reload_if_changed)
                self._guarded(self._supervise)
                time.sleep(self._until_next_tick())
        finally:
            # Warm even when the loop itself failed: running tasks finish.
            if self.supervisor is not None:
                self.supervisor.close()
            self._shutdown()
            if self.server is not None:
                self.server.stop()
        return 0

    def _ensure_broker(self) -> None:
        configured = self.partitioner.configured_broker
        if configured:
            log.info("broker %s", mask_url(configured))
            return
        # Even when attach() found a running embedded server: join it, or adopt it if the
        # launcher that started it is gone, so that someone stops it.
        self.server = EmbeddedServer.start(self.partitioner.settings.state_dir)
        self.partitioner.use_broker(self.server.url)

    def _start(self, worker: WorkerProcess) -> None:
        p = worker.partition
        try:
            given_back = give_back_unacked(self.partitioner, worker.name)
        except BrokerError as exc:
            # The worker waits for the broker by itself; the other partitions must not stop
            # because this one cannot be tidied up now.
            log.warning("%s: cannot give back tasks a previous worker left: %s", p.name, exc)
            given_back = 0
        if given_back:
            log.warning("%s: requeued %d task(s) the previous worker left", p.name, given_back)

        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = worker.log_file or open(self.log_dir / f"{p.name}.log", "ab")  # noqa: SIM115
            worker.log_file = output
        worker.size = worker.resize_to if worker.resize_to is not None else worker.target
        worker.size = 1 if p.pool == "solo" else max(worker.size, 1)
        worker.resize_to = None
        worker.pool = None
        worker.process = subprocess.Popen(
            self.command(p, worker.size),
            env=self._environment(worker),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            # The launcher alone receives the terminal's Ctrl-C and forwards one SIGTERM.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        worker.started_at = time.monotonic()
        worker.restart_at = None
        log.info(
            "%s: worker %s started (pid %d, concurrency %d, %d process(es), pool %s, queues %s)",
            p.name, worker.name, worker.process.pid, worker.target, worker.size, p.pool,
            ",".join(p.queues),
        )  # fmt: skip

    def command(self, p: Partition, size: int | None = None) -> list[str]:
        """The `celery worker` command line for partition `p` on this host."""
        cmd = [
            sys.executable, "-m", "celery", "-A", self.app_spec, "worker",
            "--hostname", p.worker_name(self.host),
            "--queues", ",".join(p.queues),
            "--pool", p.pool,
            "--prefetch-multiplier", str(p.prefetch),
            "--loglevel", self.loglevel,
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        if p.pool != "solo":
            cmd += ["--concurrency", str(max(1, p.concurrency if size is None else size))]
        return cmd

    def _environment(self, worker: WorkerProcess) -> dict[str, str]:
        env = dict(os.environ)
        env[WORKER_ENV] = worker.name
        env[TARGET_ENV] = str(worker.target)
        if self.partitioner.broker_url:
            env["PARTITIONER_BROKER_URL"] = self.partitioner.broker_url
        config = os.environ.get(CONFIG_ENV)
        if config:
            env[CONFIG_ENV] = str(Path(config).resolve())
        return env

    def _tend(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is None or worker.running:
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restarts += 1
                    self._start(worker)
                elif worker.degraded and now - worker.started_at >= STABLE_AFTER_S:
                    worker.degraded = False
                    worker.failures = 0
                    log.info("%s: recovered; no longer degraded", worker.partition.name)
                continue
            code = worker.process.returncode
            ran_s = now - worker.started_at
            worker.process = None
            if worker.resize_to is not None and code == 0:
                log.info(
                    "%s: drained; restarting at concurrency %d",
                    worker.partition.name, worker.resize_to,
                )  # fmt: skip
                self._start(worker)
                continue
            worker.failures = 1 if ran_s >= STABLE_AFTER_S else worker.failures + 1
            delay_s = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (worker.failures - 1))
            worker.restart_at = now + delay_s
            log.warning(
                "%s: worker %s exited with code %s after %.1f s; restarting in %.0f s",
                worker.partition.name, worker.name, code, ran_s, delay_s,
            )  # fmt: skip
            limit = self.partitioner.settings.supervisor.crash_loop_restarts
            if worker.failures >= limit and not worker.degraded:
                worker.degraded = True
                log.error(
                    "%s: degraded: its worker died %d times in a row, each within %.0f s of "
                    "starting; still restarting it, the other partitions are unaffected",
                    worker.partition.name, worker.failures, STABLE_AFTER_S,
                )  # fmt: skip

    def _until_next_tick(self) -> float:
        # Wake for the next control step on time, not at the next poll after it.
        if not self.partitioner.settings.supervisor.enabled:
            return POLL_INTERVAL_S
        return max(0.0, min(POLL_INTERVAL_S, self._next_step - time.monotonic()))

    def _guarded(self, step: Callable[[], None]) -> None:
        # The supervisor and the reload are extras: their failure must not stop the workers
        # being kept alive. Logged once per run of failures.
        try:
            step()
        except Exception:
            if step.__name__ not in self._failing:
                log.exception("%s failed; the workers run on, it retries each step", step.__name__)
            self._failing.add(step.__name__)
        else:
            self._failing.discard(step.__name__)

    def _supervise(self) -> None:
        settings = self.partitioner.settings.supervisor
        now = time.monotonic()
        if not settings.enabled or now < self._next_step:
            return
        self._next_step = now + settings.interval_s
        if self.supervisor is None:
            self.supervisor = Supervisor(self.partitioner, self.host, record_for(self.partitioner))
        pools = Pools(
            workers={w.partition.name: w.name for w in self.workers if w.running},
            degraded=[w.partition.name for w in self.workers if w.degraded],
        )
        targets = self.supervisor.step(pools, now)
        if targets:
            self.apply(targets)

    def apply(self, targets: dict[str, int]) -> None:
        """Bring this host's pools to `targets`, by partition name."""
        resize: dict[str, int] = {}
        for worker in self.workers:
            target = targets.get(worker.partition.name)
            if target is None:
                continue
            # The leader plans with its own limits: keep to this host's.
            p = self.partitioner.topology.by_name[worker.partition.name]
            target = min(max(target, p.min), p.max)
            if target != worker.target:
                worker.target = target
                worker.planned_at = time.monotonic()
            if not worker.running or worker.resize_to is not None or worker.settled():
                continue
            if worker.resizable or target in (0, worker.size):
                resize[worker.name] = target
            else:
                # A pool that cannot resize in place: a warm shutdown lets its running
                # tasks finish and gives reserved ones back; _tend() starts it again.
                worker.resize_to = target
                log.info(
                    "%s: draining its %s pool to restart it at concurrency %d",
                    worker.partition.name, worker.partition.pool, target,
                )  # fmt: skip
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        if resize:
            self._resize(resize)

    def _resize(self, targets: dict[str, int]) -> None:
        by_name = {w.name: w for w in self.workers}
        # A worker that has never answered may still be starting: its reply is not waited
        # for long, so that it does not hold up the steps (it is asked again next step).
        timeout_s = min(1.0, self.partitioner.settings.supervisor.interval_s)
        if any(by_name[name].pool is None for name in targets):
            timeout_s = min(timeout_s, NEW_WORKER_REPLY_S)
        try:
            answers = send_targets(self.partitioner.app, targets, timeout_s, list(targets))
        except connection_errors(self.partitioner.app) as exc:
            log.warning("cannot reach the workers to resize them: %s", exc)
            return
        for answer in answers:
            worker = by_name.get(answer["worker"])
            if worker is None:
                continue
            was_settled = worker.settled()
            worker.pool = dict(answer)
            if worker.settled() and not was_settled:
                log.info(
                    "%s: pool at %d (%d process(es)), %.2f s after the plan",
                    worker.partition.name, answer["slots"], answer["size"],
                    time.monotonic() - worker.planned_at,
                )  # fmt: skip

    def _reload_if_changed(self) -> None:
        modified = _modified(self.config)
        if not self._reload_asked and modified == self._config_seen:
            return
        self._reload_asked = False
        self._config_seen = modified
        where = str(self.config) if self.config else "the environment and .env"
        try:
            settings, topology, changed = live.reload(self.partitioner.settings, self.config)
        except PartitionerError as exc:
            log.error("settings in %s refused; the running settings stay:\n%s", where, exc)
            return
        if not changed:
            log.info("settings in %s read again: nothing changed", where)
            return
        self.partitioner.settings = settings
        self.partitioner.topology = topology
        log.info("settings in %s applied: %s", where, "; ".join(changed))
        if self.supervisor is not None:
            # Made again at the next step, with the new timing and lease.
            self.supervisor.close()
            self.supervisor = None
        if not settings.supervisor.enabled:
            self.apply({p.name: p.concurrency for p in topology.partitions})
        self._next_step = 0.0

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self._reload_asked = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping += 1
        if self._stopping == 1:
            log.info("%s received: warm shutdown of all workers", signal.Signals(signum).name)
        else:
            log.warning("second signal: cold shutdown, running tasks are requeued")
            self._signal_all(signal.SIGQUIT)

    def _shutdown(self) -> None:
        self._signal_all(signal.SIGTERM)
        timeout_s = self.partitioner.settings.shutdown_timeout_s
        if not self._wait_all(timeout_s):
            log.warning("workers still busy after %.0f s: cold shutdown", timeout_s)
            self._signal_all(signal.SIGQUIT)
            if not self._wait_all(KILL_AFTER_S):
                self._signal_all(signal.SIGKILL)
                self._wait_all(KILL_AFTER_S)
        for worker in self.workers:
            if worker.log_file is not None:
                worker.log_file.close()
        log.info("all workers stopped")

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.running:
                assert worker.process is not None
                worker.process.send_signal(signum)

    def _wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(worker.running for worker in self.workers):
                return True
            time.sleep(POLL_INTERVAL_S)
        return not any(worker.running for worker in self.workers)


def launch(app_spec: str, **options: Any) -> int:
    """Load `app_spec`, check it has Partitioner attached, and run its workers."""
    app = load_app(app_spec)
    # The workers must load the attribute load_app() checked: `celery -A pkg.mod:` looks
    # for an attribute named "" instead of the default `app`.
    module_name, _, attr = app_spec.partition(":")
    worker_spec = f"{module_name}:{attr or 'app'}"
    return Launcher(worker_spec, partitioner_of(app), **options).run()


def die_with_parent() -> None:
    """In a child process before exec: get SIGTERM when the parent dies.

    If a launcher (or the demo, or a benchmark) is killed outright, its workers then get a
    warm shutdown instead of running on unsupervised.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _modified(path: Path | None) -> float | None:
    # The settings file's modification time; None when there is none, or it is gone.
    if path is None:
        return None
    try:
        return path.stat().st_mtime
    except OSError:
        return None
