"""`partitioner status --json` against live workers: backlog, concurrency and limits."""

from __future__ import annotations

import json

import pytest
from celery import Celery

from .conftest import (
    PARTITIONS,
    TASKS,
    Broker,
    Control,
    Launch,
    run_partitioner,
    wait_until,
)

pytestmark = pytest.mark.e2e

SENT = 3
PRIORITY_SENT = 2


@pytest.mark.timeout(90)
def test_status_counts_waiting_reserved_and_running_tasks(
    broker: Broker,
    control: Control,
    producer: Celery,
    environment: dict[str, str],
    launcher: Launch,
) -> None:
    # Given payment's dependency hanging, and payment tasks sent to live workers
    control.set_fault("payment", "hang:4")
    launched = launcher(environment)
    launched.wait_ready(producer)
    for order_id in range(SENT):
        producer.send_task(TASKS["payment"], kwargs={"order_id": order_id})
    wait_until(lambda: launched.active(producer, "payment"), 15, "a payment task")

    # And, on Redis, tasks with a priority, which kombu keeps in lists of their own
    sent = SENT
    if broker.is_redis:
        for order_id in range(PRIORITY_SENT):
            kwargs = {"order_id": order_id}
            producer.send_task(TASKS["payment"], kwargs=kwargs, priority=6)
        sent += PRIORITY_SENT

    # When the status is asked for
    done = run_partitioner("status", "--json", env=environment)

    # Then payment runs one task and holds the rest; the other partitions hold nothing
    assert done.returncode == 0, done.stderr
    found = {p["name"]: p for p in json.loads(done.stdout)["partitions"]}
    assert list(found) == list(PARTITIONS)
    payment = found["payment"]
    assert payment["running"] == 1
    assert payment["waiting"] + payment["reserved"] == sent - 1
    assert payment["backlog"] == sent
    # On Redis, the breakers keep their state there, and add a probe and a parking queue
    breaker_queues = {"payment.probe": 0, "payment.parked": 0} if broker.is_redis else {}
    assert payment["queues"] == {"payment": payment["waiting"], **breaker_queues}
    assert payment["waiting"] == broker.waiting("payment")
    for partition in PARTITIONS:
        figures = found[partition]
        assert figures["workers"] == [launched.worker(partition)]
        assert (figures["concurrency"], figures["min"], figures["max"]) == (1, 1, 2)
        if partition != "payment":
            assert figures["backlog"] == figures["running"] == figures["waiting"] == 0


@pytest.mark.timeout(30)
def test_status_without_workers_counts_waiting_tasks(
    broker: Broker, producer: Celery, environment: dict[str, str]
) -> None:
    # Given tasks sent while no worker runs
    producer.send_task(TASKS["order"], kwargs={"order_id": 1})
    producer.send_task(TASKS["order"], kwargs={"order_id": 2}, priority=6)

    # When the status is asked for
    done = run_partitioner("status", "--json", "--timeout", "0.5", env=environment)

    # Then the broker's count is the backlog, and no pool is reported
    assert done.returncode == 0, done.stderr
    found = {p["name"]: p for p in json.loads(done.stdout)["partitions"]}
    order = found["order"]
    assert (order["waiting"], order["backlog"], order["workers"]) == (2, 2, [])
