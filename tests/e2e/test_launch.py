"""`partitioner launch`: a worker per partition, warm shutdown, refusals up front."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from celery import Celery

from .conftest import (
    CONTROL_URL,
    PARTITIONS,
    TASKS,
    Broker,
    Control,
    Launch,
    celery_pids,
    command_env,
    run_partitioner,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(90)
def test_each_partition_gets_a_worker_that_runs_only_its_tasks(
    broker: Broker,
    control: Control,
    producer: Celery,
    environment: dict[str, str],
    launcher: Launch,
) -> None:
    # Given a launcher with its workers up
    launched = launcher(environment)
    launched.wait_ready(producer)

    # Then each worker is named <partition>@<host> and consumes its own queues only: on
    # Redis, where the breakers keep their state, its breaker's probe queue too
    def own_queues(partition: str) -> list[str]:
        return sorted([partition, f"{partition}.probe"] if broker.is_redis else [partition])

    def consumed() -> dict[str, list[str]]:
        inspect = producer.control.inspect(destination=launched.workers, timeout=2)
        replies = inspect.active_queues() or {}
        return {name: sorted(q["name"] for q in queues) for name, queues in replies.items()}

    expected = {launched.worker(p): own_queues(p) for p in PARTITIONS}
    wait_until(lambda: consumed() == expected, 10, f"workers to consume {expected}")
    for partition in PARTITIONS:
        assert launched.worker_pid(partition) is not None, partition
        assert len(launched.pool_pids(partition)) == 1, partition

    # When one task of each service is sent
    kwargs = {"sent_at": time.time()}
    sent = {p: producer.send_task(TASKS[p], kwargs=kwargs).id for p in PARTITIONS}

    # Then each runs once, on its own partition's worker and on no other
    wait_until(
        lambda: all(control.runs(task_id) for task_id in sent.values()),
        30,
        "every service's task to complete",
    )
    for partition, task_id in sent.items():
        assert control.runs(task_id) == 1
        ran_on = [p for p in PARTITIONS if f"[{task_id}] succeeded" in launched.log(p)]
        assert ran_on == [partition]


@pytest.mark.timeout(90)
def test_sigterm_finishes_running_tasks_and_keeps_queued_ones(
    broker: Broker,
    control: Control,
    producer: Celery,
    environment: dict[str, str],
    launcher: Launch,
) -> None:
    # Given a payment task of 2 s running and three more queued behind it
    launched = launcher(environment)
    launched.wait_ready(producer)
    kwargs = {"sent_at": time.time(), "work_s": 2}
    sent = [producer.send_task(TASKS["payment"], kwargs=kwargs).id for _ in range(4)]
    wait_until(lambda: launched.active(producer, "payment"), 15, "the first task")

    # When the launcher receives SIGTERM
    signalled_at = time.time()
    code = launched.stop()

    # Then the running task completed after the signal, and the launcher exited cleanly
    assert code == 0, launched.log()
    done = control.ledger()
    assert [entry["id"] for entry in done] == sent[:1]
    assert done[0]["done_at"] > signalled_at
    assert "all workers stopped" in launched.log()

    # And no worker process is left, and the queued tasks are still in the broker
    assert celery_pids(launched.host) == []
    wait_until(lambda: broker.waiting("payment") == 3, 5, "three payment tasks queued")


@dataclass(frozen=True)
class Refusal:
    """A launch that must stop before any worker starts, and what its message names."""

    id: str
    app_spec: str
    exit_code: int
    names: list[str]
    env: dict[str, str] = field(default_factory=dict)


REFUSALS = [
    Refusal(
        "module-missing",
        "no_such_shop.app:app",
        exit_code=5,
        names=["--app 'no_such_shop.app:app'", "module 'no_such_shop' not found"],
    ),
    Refusal(
        "attribute-not-a-celery-app",
        "workers.app:partitioner",
        exit_code=5,
        names=["workers.app.partitioner is not a Celery app"],
    ),
    Refusal(
        "limit-out-of-range",
        "workers.app:app",
        exit_code=3,
        names=[
            "partitions.payment.max",
            "from environment variable PARTITIONER_PARTITIONS__PAYMENT__MAX",
        ],
        env={"PARTITIONER_PARTITIONS__PAYMENT__MAX": "0"},
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in REFUSALS])
def test_bad_app_or_settings_stop_launch_before_any_worker_starts(
    tmp_path: Path, case: Refusal
) -> None:
    # Given a broker that would work, and one thing wrong
    env = command_env(CONTROL_URL, **case.env)
    host = f"e2e-refused-{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path / "logs"

    # When the launcher is started
    args = ["--app", case.app_spec, "--hostname", host, "--log-dir", str(log_dir)]
    done = run_partitioner("launch", *args, env=env)

    # Then it exits with the named code and one message that names the problem
    assert done.returncode == case.exit_code, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.startswith("error: "), done.stderr
    assert done.stderr.count("error: ") == 1, done.stderr
    for name in case.names:
        assert name in done.stderr

    # And no worker was started
    assert not log_dir.exists()
    assert celery_pids(host) == []
