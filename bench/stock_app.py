"""Stock Celery, without Partitioner: the shop's tasks on one shared queue.

The tasks are `workers.services`' shared tasks, so both layouts run the same code. The
broker comes from `BENCH_BROKER_URL` (default: Redis database 12 on this machine).
"""

from __future__ import annotations

import os

from celery import Celery

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/12"
BROKER_ENV = "BENCH_BROKER_URL"
QUEUE = "shop-stock"

app = Celery(
    "shop-stock",
    broker=os.environ.get(BROKER_ENV) or DEFAULT_BROKER_URL,
    include=["workers.services"],
)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
