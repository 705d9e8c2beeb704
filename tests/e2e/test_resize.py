"""Resizing a partition's pool in place: real workers, the `partitioner_resize` command.

Each test launches the shop's notification partition alone, with the supervisor off, so
that only the test sets the pool's target.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

from partitioner.supervisor.pool import PoolFigures, send_targets

from .conftest import (
    TASKS,
    Broker,
    Control,
    Launch,
    Launched,
    command_env,
    run_partitioner,
    wait_until,
)
from .test_breaker import log_time, redis_client_ids

pytestmark = pytest.mark.e2e

PARTITION = "notification"
TASK = TASKS[PARTITION]
CONFIG = """\
budget = 3
name = "shop"

[partitions.notification]
tasks = ["shop.notification.*"]
min = 0
max = 3
concurrency = {concurrency}
pool = "{pool}"
"""
LONG_S = 3.0
SHORT_S = 0.2
# A resize's answer comes back within a broker round trip or two.
REPLY_S = 1.0
# Long enough for a worker that fetches to have fetched.
QUIET_S = 1.0


@dataclass
class Pool:
    """The launched notification worker and a producer that sends it tasks."""

    launched: Launched
    app: Celery
    env: dict[str, str]

    @property
    def worker(self) -> str:
        return self.launched.worker(PARTITION)

    def resize(self, target: int) -> PoolFigures:
        """Send the worker its target; its answer."""
        return self._ask({self.worker: target})

    def figures(self) -> PoolFigures:
        """The worker's answer to a resize that names other workers only."""
        return self._ask({})

    def send(self, work_s: float) -> str:
        kwargs = {"sent_at": time.time(), "work_s": work_s}
        return str(self.app.send_task(TASK, kwargs=kwargs).id)

    def log(self) -> str:
        return self.launched.log(PARTITION)

    def _ask(self, targets: dict[str, int]) -> PoolFigures:
        replies = send_targets(self.app, targets, REPLY_S, workers=[self.worker])
        assert [r["worker"] for r in replies] == [self.worker], replies
        return replies[0]


Start = Callable[..., Pool]


@pytest.fixture
def start(
    broker: Broker, producer: Celery, launcher: Launch, tmp_path: Path
) -> Callable[..., Pool]:
    """A factory: launch the notification partition alone, and wait until it answers."""

    def start(concurrency: int = 1, pool: str = "prefork") -> Pool:
        config = tmp_path / f"partitioner-{pool}-{concurrency}.toml"
        config.write_text(CONFIG.format(concurrency=concurrency, pool=pool))
        env = command_env(
            broker.url,
            PARTITIONER_CONFIG=str(config),
            PARTITIONER_SUPERVISOR__ENABLED="false",
        )
        started = Pool(launcher(env), producer, env)

        def answers() -> bool:
            assert started.launched.process.poll() is None, started.launched.log()
            replies = send_targets(producer, {}, 0.5, workers=[started.worker])
            return bool(replies)

        wait_until(answers, 45, f"{started.worker} to answer")
        return started

    return start


def logged_at(log: str, task_id: str, event: str) -> float:
    """When the worker logged `event` (`received`, `succeeded`) for `task_id`."""
    lines = [line for line in log.splitlines() if f"[{task_id}] {event}" in line]
    assert len(lines) == 1, f"{task_id} {event}: {lines}"
    return log_time(lines[0])


@pytest.mark.timeout(60)
def test_grow_is_immediate_and_shrink_waits_for_running_tasks(
    broker: Broker, control: Control, start: Start
) -> None:
    # Given a worker with one process
    pool = start(concurrency=1)
    assert pool.figures()["size"] == 1

    # When it is resized to 3
    asked_at = time.monotonic()
    grown = pool.resize(3)

    # Then its answer says 3 processes, and they run
    assert time.monotonic() - asked_at < REPLY_S
    assert (grown["slots"], grown["size"], grown["resizable"]) == (3, 3, True)
    assert len(pool.launched.pool_pids(PARTITION)) == 3

    # And it fetches and runs 3 long tasks at once
    long = [pool.send(LONG_S) for _ in range(3)]
    wait_until(lambda: pool.figures()["busy"] == 3, 5, "3 tasks running at once")

    # When 2 short tasks wait behind them, and the pool is resized to 1
    short = [pool.send(SHORT_S) for _ in range(2)]
    shrunk = pool.resize(1)

    # Then it keeps its 3 processes until their tasks end, and fetches nothing meanwhile
    assert (shrunk["slots"], shrunk["size"], shrunk["busy"]) == (1, 3, 3)
    assert shrunk["draining"]
    assert broker.waiting(PARTITION) == 2

    # And every task completes once, none killed
    everything = [*long, *short]
    wait_until(lambda: all(control.runs(t) for t in everything), 15, "every task to end")
    assert [e["ok"] for e in control.ledger()] == [True] * 5
    assert all(control.runs(task_id) == 1 for task_id in everything)

    # And the short tasks were fetched one at a time, after the long ones had ended
    log = pool.log()
    long_done = max(logged_at(log, task_id, "succeeded") for task_id in long)
    first, second = sorted(short, key=lambda task_id: logged_at(log, task_id, "received"))
    assert logged_at(log, first, "received") >= long_done
    assert logged_at(log, second, "received") >= logged_at(log, first, "succeeded")

    # And the pool is down to one process
    settled = wait_until(
        lambda: (f := pool.figures())["size"] == 1 and not f["draining"] and f,
        5,
        "the pool to shrink to 1",
    )
    assert (settled["slots"], settled["busy"]) == (1, 0)
    assert len(pool.launched.pool_pids(PARTITION)) == 1
    assert "WorkerLostError" not in log
    assert " exited with " not in log

    # And `status --json` shows the pool and the tasks' mean run time
    done = run_partitioner("status", "--json", env=pool.env)
    assert done.returncode == 0, done.stderr
    found = {p["name"]: p for p in json.loads(done.stdout)["partitions"]}[PARTITION]
    assert (found["slots"], found["concurrency"], found["size"]) == (1, 1, 1)
    assert found["pools"] == [pool.figures()]
    mean_s = (3 * LONG_S + 2 * SHORT_S) / 5
    assert found["runtime_s"] == pytest.approx(mean_s, abs=0.2)


@pytest.mark.timeout(60)
def test_target_zero_fetches_nothing_until_resumed(
    broker: Broker, control: Control, producer: Celery, start: Start
) -> None:
    # Given a task queued before its worker starts at target 0
    kwargs = {"sent_at": time.time(), "work_s": SHORT_S}
    queued = str(producer.send_task(TASK, kwargs=kwargs).id)
    pool = start(concurrency=0)

    # Then the worker keeps one idle process and fetches nothing
    paused = pool.figures()
    assert (paused["target"], paused["slots"], paused["size"]) == (0, 0, 1)
    time.sleep(QUIET_S)
    assert broker.waiting(PARTITION) == 1
    assert not control.ledger()

    # When it is resized to 1, the task runs
    resumed = pool.resize(1)
    assert (resumed["slots"], resumed["size"]) == (1, 1)
    wait_until(lambda: control.runs(queued), 5, "the queued task to run")

    # When it is resized to 0 again, a new task waits
    assert pool.resize(0)["slots"] == 0
    held = pool.send(SHORT_S)
    time.sleep(QUIET_S)
    assert broker.waiting(PARTITION) == 1
    assert not control.runs(held)

    # And runs once the worker is resumed
    pool.resize(1)
    wait_until(lambda: control.runs(held), 5, "the held task to run")
    assert len(pool.launched.pool_pids(PARTITION)) == 1


@pytest.mark.timeout(60)
def test_threads_pool_pauses_and_resumes_but_does_not_resize(
    broker: Broker, control: Control, start: Start
) -> None:
    # Given a worker with a pool of 2 threads
    pool = start(concurrency=2, pool="threads")

    # When it is resized to 3, it says it cannot, and keeps its 2 threads
    asked = pool.resize(3)
    assert (asked["target"], asked["slots"], asked["size"]) == (3, 2, 2)
    assert not asked["resizable"]

    # When it is resized to 0, it fetches nothing
    assert pool.resize(0)["slots"] == 0
    held = pool.send(SHORT_S)
    time.sleep(QUIET_S)
    assert broker.waiting(PARTITION) == 1

    # And when resized back to its size, it runs the task
    assert pool.resize(2)["slots"] == 2
    wait_until(lambda: control.runs(held), 5, "the held task to run")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_paused_worker_stays_paused_across_a_reconnect(
    broker: Broker, control: Control, start: Start
) -> None:
    # Given a paused worker
    pool = start(concurrency=1)
    assert pool.resize(0)["slots"] == 0

    # When every Redis connection of its processes is killed, and it reconnects
    launched = pool.launched
    worker = launched.worker_pid(PARTITION)
    assert worker is not None
    pids = [worker, *launched.pool_pids(PARTITION)]
    killed = redis_client_ids(pids, control.store)
    assert killed, "the worker holds no Redis connections"
    before = pool.log().count("Connected to redis")
    for client_id in killed:
        control.store.client_kill_filter(_id=client_id)
    wait_until(lambda: pool.log().count("Connected to redis") > before, 15, "a reconnect")

    # Then it still fetches nothing
    held = pool.send(SHORT_S)
    time.sleep(QUIET_S)
    assert broker.waiting(PARTITION) == 1
    assert pool.figures()["slots"] == 0
    reconnected = pool.log().split("Connection to broker lost", 1)[1]
    assert "Started consuming from notification" not in reconnected

    # And runs the task once resumed
    pool.resize(1)
    wait_until(lambda: control.runs(held), 5, "the held task to run")
