"""Sending the shop's tasks by name, with the `sent_at` that the ledger measures from.

Tasks are sent with `app.send_task` on the app passed in, never through Celery's
current app, so that each layout's tasks reach the broker and queues that layout's
workers consume.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from celery import Celery

TASK_NAMES = {
    "order": "shop.order.place",
    "payment": "shop.payment.charge",
    "inventory": "shop.inventory.reserve",
    "notification": "shop.notification.send",
}


@dataclass(frozen=True)
class Sent:
    """One task the benchmark sent."""

    id: str
    service: str
    sent_at: float


def send(app: Celery, service: str, number: int, work_s: float) -> Sent:
    """Send one task of `service`, stamped with the current time."""
    sent_at = time.time()
    result = app.send_task(
        TASK_NAMES[service],
        kwargs={"order_id": number, "sent_at": sent_at, "work_s": work_s},
    )
    return Sent(str(result.id), service, sent_at)


# How `steady` sends one task: `send`, or a wrapper that returns None for a task that
# was not sent (one the producer gate rejected, say).
Sender = Callable[[Celery, str, int, float], Sent | None]


def burst(app: Celery, service: str, count: int, work_s: float) -> list[Sent]:
    """Send `count` tasks of `service` at once."""
    return [send(app, service, number, work_s) for number in range(count)]


def steady(
    app: Celery,
    services: Iterable[str],
    rate_per_s: float,
    duration_s: float,
    work_s: float,
    sender: Sender = send,
) -> list[Sent]:
    """Send `rate_per_s` tasks a second to each service for `duration_s`, from now.

    The services' sends are staggered within each interval rather than sent together, as
    independent clients would send them. Tasks that `sender` did not send are left out.
    """
    schedule = _schedule(tuple(services), rate_per_s, duration_s)
    start = time.monotonic()
    sent = []
    for offset_s, service, number in schedule:
        delay_s = start + offset_s - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        found = sender(app, service, number, work_s)
        if found is not None:
            sent.append(found)
    return sent


def _schedule(
    services: tuple[str, ...], rate_per_s: float, duration_s: float
) -> list[tuple[float, str, int]]:
    interval_s = 1.0 / rate_per_s
    count = round(duration_s * rate_per_s)
    stagger_s = interval_s / len(services)
    schedule = [
        (number * interval_s + index * stagger_s, service, number)
        for number in range(count)
        for index, service in enumerate(services)
    ]
    return sorted(schedule)
