"""Launching partitioned workers: one Celery worker process per partition, kept alive.

Each partition gets an ordinary `celery worker` process named `<partition>@<host>` that
consumes only the partition's queues, with the partition's concurrency and pool type. The
launcher restarts a worker that dies, with a growing delay, and leaves the others alone. On
SIGTERM or Ctrl-C it asks every worker for a warm shutdown (running tasks finish, reserved
ones go back to the broker) and only after `shutdown_timeout_s` turns it into a cold one.
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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from celery import Celery

from partitioner.app import WORKER_ENV, Partitioner, partitioner_of, unacked_keys
from partitioner.embedded import EmbeddedServer
from partitioner.errors import BrokerError, LaunchError, PartitionerError
from partitioner.observe import BROKER_TIMEOUT_S, connection_errors, unreachable
from partitioner.settings import CONFIG_ENV, mask_url
from partitioner.topology import Partition

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 30.0
# A worker that ran this long before dying is restarted at once, not after a longer delay.
STABLE_AFTER_S = 30.0
POLL_INTERVAL_S = 0.2
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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


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
            WorkerProcess(p, p.worker_name(self.host)) for p in partitioner.topology.partitions
        ]
        self.server: EmbeddedServer | None = None
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
                time.sleep(POLL_INTERVAL_S)
            self._shutdown()
        finally:
            for worker in self.workers:
                if worker.running:
                    assert worker.process is not None
                    worker.process.kill()
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
        worker.process = subprocess.Popen(
            self.command(p),
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
            "%s: worker %s started (pid %d, concurrency %d, pool %s, queues %s)",
            p.name, worker.name, worker.process.pid, p.concurrency, p.pool, ",".join(p.queues),
        )  # fmt: skip

    def command(self, p: Partition) -> list[str]:
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
            cmd += ["--concurrency", str(p.concurrency)]
        return cmd

    def _environment(self, worker: WorkerProcess) -> dict[str, str]:
        env = dict(os.environ)
        env[WORKER_ENV] = worker.name
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
                continue
            code = worker.process.returncode
            ran_s = now - worker.started_at
            worker.failures = 1 if ran_s >= STABLE_AFTER_S else worker.failures + 1
            delay_s = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (worker.failures - 1))
            worker.process = None
            worker.restart_at = now + delay_s
            log.warning(
                "%s: worker %s exited with code %s after %.1f s; restarting in %.0f s",
                worker.partition.name, worker.name, code, ran_s, delay_s,
            )  # fmt: skip

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

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
