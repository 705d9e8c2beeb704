"""Routing on a real broker: a task lands in its partition's queue, or is refused."""

from __future__ import annotations

import pytest
from celery import Celery

from partitioner import RoutingError

from .conftest import PARTITIONS, TASKS, Broker, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(30)
def test_a_task_lands_in_its_partitions_queue(broker: Broker, producer: Celery) -> None:
    # Given no worker at all, when two payment tasks are sent
    for order_id in (1, 2):
        producer.send_task(TASKS["payment"], kwargs={"order_id": order_id})

    # Then they wait in the payment queue, and in no other
    # (RabbitMQ counts a message published on another connection a moment later)
    wait_until(lambda: broker.waiting("payment") == 2, 5, "two payment tasks queued")
    waiting = {queue: broker.waiting(queue) for queue in PARTITIONS}
    assert waiting == {"order": 0, "payment": 2, "inventory": 0, "notification": 0}


@pytest.mark.timeout(30)
def test_an_unknown_task_is_refused_when_sent(broker: Broker, producer: Celery) -> None:
    # When a task that no partition owns is sent
    refused = r"'shop\.refund\.issue' matches no partition"
    with pytest.raises(RoutingError, match=refused):
        producer.send_task("shop.refund.issue", kwargs={"order_id": 1})

    # Then nothing was published anywhere
    assert all(broker.waiting(queue) == 0 for queue in PARTITIONS)
