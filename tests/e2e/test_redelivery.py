"""A task whose process is killed mid-run is delivered again, and the launcher heals."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from celery import Celery

from .conftest import (
    PARTITIONS,
    TASKS,
    Broker,
    Control,
    Launch,
    Launched,
    alive,
    kill,
    wait_until,
)

pytestmark = pytest.mark.e2e

# Long enough that the task can only complete by running again after the kill.
HANG = "hang:30"


def start_hanging_payment(
    control: Control, producer: Celery, launched: Launched
) -> tuple[str, int]:
    """Send a payment task that hangs; return its id and the pool process running it."""
    control.set_fault("payment", HANG)
    task_id = producer.send_task(TASKS["payment"], kwargs={"sent_at": time.time()}).id
    active = wait_until(lambda: launched.active(producer, "payment"), 15, "the task")
    assert [task["id"] for task in active] == [task_id]

    # The task read its fault when it started; the next execution runs normally.
    control.set_fault("payment", "ok")
    return task_id, int(active[0]["worker_pid"])


@pytest.mark.timeout(90)
def test_killed_pool_process_task_runs_again(
    broker: Broker,
    control: Control,
    producer: Celery,
    environment: dict[str, str],
    launcher: Launch,
) -> None:
    # Given a payment task running in the payment worker's pool process
    launched = launcher(environment)
    launched.wait_ready(producer)
    worker_pid = launched.worker_pid("payment")
    task_id, pool_pid = start_hanging_payment(control, producer, launched)
    assert launched.pool_pids("payment") == [pool_pid]

    # When that pool process is killed
    os.kill(pool_pid, signal.SIGKILL)

    # Then the task runs again, to completion, once, in the same worker's new process
    wait_until(lambda: control.runs(task_id), 30, "the killed task to run again")
    assert control.runs(task_id) == 1
    log = launched.log("payment")
    assert log.count(f"[{task_id}] received") == 2, log
    assert "WorkerLostError" in log
    assert launched.worker_pid("payment") == worker_pid
    assert launched.pool_pids("payment") not in ([], [pool_pid])


@pytest.mark.timeout(120)
def test_killed_worker_is_restarted_and_its_task_runs_again(
    broker: Broker,
    control: Control,
    producer: Celery,
    environment: dict[str, str],
    launcher: Launch,
) -> None:
    # Given all workers up, and a payment task running
    launched = launcher(environment)
    launched.wait_ready(producer)
    before = {p: launched.worker_pid(p) for p in PARTITIONS}
    task_id, pool_pid = start_hanging_payment(control, producer, launched)

    # When the payment worker's main process and its pool are killed outright
    killed = before["payment"]
    assert killed is not None
    kill([killed, pool_pid])
    wait_until(lambda: not alive(pool_pid), 5, "the pool process to die")

    # Then the launcher restarts it after a delay, and says so
    said = re.compile(
        rf"payment: worker {re.escape(launched.worker('payment'))} exited with code -9 "
        r"after [\d.]+ s; restarting in \d+ s"
    )
    wait_until(lambda: said.search(launched.log()), 15, "the launcher to say so")
    wait_until(
        lambda: launched.worker_pid("payment") not in (None, killed),
        15,
        "a new payment worker",
    )

    # And the task that was running runs again, once, on the new worker
    wait_until(lambda: control.runs(task_id), 45, "the task to run after the restart")
    assert control.runs(task_id) == 1
    assert launched.log("payment").count(f"[{task_id}] received") == 2
    if broker.is_redis:
        # Redis keeps a dead consumer's messages until someone gives them back.
        assert "payment: requeued 1 task(s) the previous worker left" in launched.log()

    # And the other partitions' workers were left alone
    others = [p for p in PARTITIONS if p != "payment"]
    assert [launched.worker_pid(p) for p in others] == [before[p] for p in others]
