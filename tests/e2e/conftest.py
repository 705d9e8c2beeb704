"""Fixtures of the end-to-end tests: brokers, the control store, producers, launchers.

Every test runs the real `partitioner launch --app workers.app:app` command with the
reference shop in `workers/`, against Redis database 11 or the RabbitMQ vhost
`partitioner_test`, so that a benchmark using the same servers is not disturbed. Worker
names carry a host part unique to the test, which is also how leftovers are found.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from kombu import Connection

from partitioner import attach, load_settings
from workers import control as shop_control

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "config/partitioner.toml"
PARTITIONER = str(Path(sys.executable).with_name("partitioner"))
CONTROL_URL = "redis://127.0.0.1:6379/11"
BROKER_URLS = {
    "redis": CONTROL_URL,
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/partitioner_test",
}
VHOST = "partitioner_test"
PARTITIONS = ("order", "payment", "inventory", "notification")
TASKS = {
    "order": "shop.order.place",
    "payment": "shop.payment.charge",
    "inventory": "shop.inventory.reserve",
    "notification": "shop.notification.send",
}
# kombu's Redis transport keeps a message with a priority in a list of its own, named
# `<queue>` + this separator + the priority step (0 lives in the plain list).
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (3, 6, 9)
READY_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1
) -> T:
    """Poll `check` until its result is truthy and return it; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


# Processes, read from /proc so that no extra package is needed.


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces; the fields after it do not.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    """The command line of `pid`, or "" when it is gone."""
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode()


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def celery_pids(host: str) -> list[int]:
    """Every live celery process of a worker named `<partition>@<host>`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        line = command_line(int(entry.name))
        if "celery" in line and f"@{host} " in line and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill(pids: list[int]) -> None:
    """SIGKILL each pid that still exists."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# The control store: fault switches and the completion ledger of the shop in workers/.


@dataclass
class Control:
    """The shop's control store, in Redis database 11."""

    store: redis.Redis

    def set_fault(self, service: str, fault: str) -> None:
        """Switch `service`'s dependency, e.g. to `hang:4` or back to `ok`."""
        self.store.set(shop_control.key("fault", service), fault)

    def ledger(self) -> list[dict[str, Any]]:
        """Every completion recorded so far, oldest first."""
        return shop_control.read_ledger(self.store)

    def runs(self, task_id: str) -> int:
        """How many executions of `task_id` completed."""
        return sum(1 for entry in self.ledger() if entry["id"] == task_id)


@pytest.fixture
def control() -> Iterator[Control]:
    """The control store, empty at the start of the test."""
    store = redis.Redis.from_url(CONTROL_URL, socket_timeout=5)
    store.flushdb()
    yield Control(store)
    store.close()


# Brokers.


@dataclass
class Broker:
    """One broker the tests run against: `redis` or `rabbitmq`."""

    name: str
    url: str

    @property
    def is_redis(self) -> bool:
        return self.name == "redis"

    def waiting(self, queue: str) -> int:
        """Messages in `queue` that no worker has fetched, as the broker counts them."""
        if self.is_redis:
            steps = REDIS_PRIORITY_STEPS
            keys = [queue] + [f"{queue}{REDIS_PRIORITY_SEP}{step}" for step in steps]
            with redis.Redis.from_url(self.url) as client:
                return sum(int(client.llen(key)) for key in keys)
        with Connection(self.url) as connection:
            channel = connection.default_channel
            try:
                _, count, _ = channel.queue_declare(queue, passive=True)
            except connection.channel_errors:
                return 0  # the queue was never declared
            return int(count)

    def reset(self) -> None:
        """Empty the partition queues; on Redis, `control` has flushed the database."""
        if self.is_redis:
            return
        # Purged, not deleted: kombu shares one connection per URL between all apps of a
        # process, and with it a record of the queues declared, so a producer would not
        # declare a deleted queue again and its messages would be dropped.
        with Connection(self.url) as connection:
            errors = connection.channel_errors
            for queue in PARTITIONS:
                # A queue never declared is nothing to purge (and closes the channel).
                with connection.channel() as channel, suppress(*errors):
                    channel.queue_purge(queue)


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> str:
    """The RabbitMQ vhost of the tests, created with rights for `guest` if missing."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, check=True
    )
    if VHOST not in listed.stdout.split():
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", VHOST], check=True)
        grant = ["set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"]
        subprocess.run(["rabbitmqctl", "-q", *grant], check=True)
    return VHOST


@pytest.fixture(params=sorted(BROKER_URLS))
def broker(request: pytest.FixtureRequest, control: Control) -> Broker:
    """Each broker in turn, with empty partition queues."""
    name = str(request.param)
    if name == "rabbitmq":
        request.getfixturevalue("rabbitmq_vhost")
    found = Broker(name, BROKER_URLS[name])
    found.reset()
    return found


@pytest.fixture
def producer(broker: Broker) -> Iterator[Celery]:
    """A Celery app with Partitioner attached, sending to `broker`."""
    app = Celery("e2e-producer", set_as_current=False)
    config = ROOT / CONFIG
    settings, origins = load_settings(config, env_file=None, broker_url=broker.url)
    attach(app, settings, origins)
    yield app
    app.close()


# Commands.


def command_env(broker_url: str | None, **extra: str) -> dict[str, str]:
    """The environment of a command: ours, with the tests' settings replacing any
    PARTITIONER_* or WORKERS_* variable the caller had set.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PARTITIONER_", "WORKERS_"))
    }
    env["PARTITIONER_CONFIG"] = CONFIG
    env["WORKERS_CONTROL_URL"] = CONTROL_URL
    if broker_url is not None:
        env["PARTITIONER_BROKER_URL"] = broker_url
    return env | extra


@pytest.fixture
def environment(broker: Broker) -> dict[str, str]:
    """The environment of commands that run against `broker`."""
    return command_env(broker.url)


def run_partitioner(
    *args: str, env: Mapping[str, str], timeout_s: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `partitioner ARGS` from the project folder to completion."""
    return subprocess.run(
        [PARTITIONER, *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@dataclass
class Launched:
    """A running `partitioner launch` process and its workers."""

    process: subprocess.Popen[bytes]
    host: str
    log_dir: Path
    output: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def worker(self, partition: str) -> str:
        """The node name of `partition`'s worker."""
        return f"{partition}@{self.host}"

    @property
    def workers(self) -> list[str]:
        return [self.worker(p) for p in PARTITIONS]

    def worker_pid(self, partition: str) -> int | None:
        """The pid of the celery worker main process of `partition`, or None."""
        wanted = f"--hostname {self.worker(partition)} "
        found = [pid for pid in children(self.pid) if wanted in command_line(pid)]
        return found[0] if found else None

    def pool_pids(self, partition: str) -> list[int]:
        """The pids of the pool processes of `partition`'s worker."""
        worker = self.worker_pid(partition)
        return children(worker) if worker is not None else []

    def log(self, partition: str | None = None) -> str:
        """A worker's output, or the launcher's own with no `partition`."""
        path = self.output if partition is None else self.log_dir / f"{partition}.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, app: Celery, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until every partition's worker answers a ping."""
        wanted = set(self.workers)

        def all_answer() -> bool:
            assert self.process.poll() is None, f"launcher exited:\n{self.log()}"
            replies = app.control.ping(destination=sorted(wanted), timeout=0.5) or []
            return wanted <= {name for reply in replies for name in reply}

        wait_until(all_answer, timeout_s, f"workers {sorted(wanted)} to answer a ping")

    def active(self, app: Celery, partition: str) -> list[dict[str, Any]]:
        """The tasks `partition`'s worker runs, as `celery inspect active`."""
        name = self.worker(partition)
        replies = app.control.inspect(destination=[name], timeout=0.5).active() or {}
        return list(replies.get(name, []))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the launcher (a warm shutdown) and return its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def sections(self) -> list[tuple[str, str]]:
        """The tails of the launcher's and the workers' output, for a failure report."""
        found = [(f"launcher {self.host}", _tail(self.log()))]
        for partition in PARTITIONS:
            text = self.log(partition)
            if text:
                found.append((f"worker {self.worker(partition)}", _tail(text)))
        return found

    def clean_up(self) -> None:
        """End the launcher quickly and kill any celery process it left behind."""
        if self.process.poll() is None:
            # A second signal turns the warm shutdown cold: running tasks are requeued.
            self.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Workers get SIGTERM when the launcher dies, and may still be shutting down.
        kill(celery_pids(self.host))
        host = self.host
        wait_until(lambda: not celery_pids(host), 10, f"the workers of {host} to end")


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


LAUNCHED = pytest.StashKey[list[Launched]]()
Launch = Callable[..., Launched]


@pytest.fixture
def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launch]:
    """A factory that runs `partitioner launch --app workers.app:app` in the background.

    Call it with the command's environment; it returns at once with a `Launched`. Every
    launcher is stopped and every worker it started is gone when the test ends.
    """
    started: list[Launched] = []
    request.node.stash[LAUNCHED] = started

    def launch(env: Mapping[str, str], *extra_args: str) -> Launched:
        host = f"e2e-{uuid.uuid4().hex[:8]}"
        log_dir = tmp_path / f"logs-{host}"
        output = tmp_path / f"launcher-{host}.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [
                    PARTITIONER, "launch", "--app", "workers.app:app",
                    "--hostname", host, "--log-dir", str(log_dir), *extra_args,
                ],
                cwd=ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        launched = Launched(process, host, log_dir, output)
        started.append(launched)
        return launched

    yield launch

    for launched in started:
        launched.clean_up()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the launchers' and workers' output to the report of a failed test."""
    report: pytest.TestReport = yield
    if report.failed:
        for launched in item.stash.get(LAUNCHED, []):
            report.sections.extend(launched.sections())
    return report


def first_line(text: str, containing: str) -> str | None:
    """The first line of `text` that contains `containing`, or None."""
    return next((line for line in text.splitlines() if containing in line), None)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None while it does not exist (yet)."""
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return found
