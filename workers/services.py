"""The shop's tasks. Each calls its service's dependency, whose behaviour can be switched
(see `workers.faults`), and records its completion in the ledger for demos and benchmarks.

`sent_at` (epoch seconds) is set by whoever measures latency; `work_s` is the task's normal
duration in seconds (default 0.02).
"""

from __future__ import annotations

import time

from celery import Task, shared_task

from workers import control, faults

WORK_S = 0.02


def serve(task: Task, service: str, sent_at: float | None, work_s: float) -> str:
    """Run one task of `service` and record when it started and how it ended."""
    started_at = time.time()
    task_id = task.request.id
    try:
        faults.call_dependency(service, work_s)
    except faults.DependencyError:
        control.record_done(service, task_id, sent_at, ok=False, started_at=started_at)
        raise
    control.record_done(service, task_id, sent_at, ok=True, started_at=started_at)
    return service


@shared_task(bind=True, name="shop.order.place")
def place_order(
    self: Task, order_id: int = 0, sent_at: float | None = None, work_s: float = WORK_S
) -> str:
    return serve(self, "order", sent_at, work_s)


@shared_task(bind=True, name="shop.payment.charge")
def charge_payment(
    self: Task, order_id: int = 0, sent_at: float | None = None, work_s: float = WORK_S
) -> str:
    return serve(self, "payment", sent_at, work_s)


@shared_task(bind=True, name="shop.inventory.reserve")
def reserve_stock(
    self: Task, order_id: int = 0, sent_at: float | None = None, work_s: float = WORK_S
) -> str:
    return serve(self, "inventory", sent_at, work_s)


@shared_task(bind=True, name="shop.notification.send")
def send_notification(
    self: Task, order_id: int = 0, sent_at: float | None = None, work_s: float = WORK_S
) -> str:
    return serve(self, "notification", sent_at, work_s)


TASKS = {
    "order": place_order,
    "payment": charge_payment,
    "inventory": reserve_stock,
    "notification": send_notification,
}
