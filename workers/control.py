"""The shop's control store: a Redis database for fault switches and the completion ledger.

It is `WORKERS_CONTROL_URL` when set, else the shop's broker when that is Redis (the
embedded server included). With neither, faults come from the environment only and no
completions are recorded.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

PREFIX = "shop"
LEDGER = f"{PREFIX}:ledger"
_clients: dict[tuple[int, str], redis.Redis] = {}


def url() -> str | None:
    """The control store's URL, or None when there is none."""
    explicit = os.environ.get("WORKERS_CONTROL_URL")
    if explicit:
        return explicit
    from workers.app import app

    broker = str(app.conf.broker_url or "")
    return broker if broker.startswith(("redis://", "rediss://")) else None


def client() -> redis.Redis | None:
    """A client for this process (pool processes each get their own), or None."""
    found = url()
    if found is None:
        return None
    key = (os.getpid(), found)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(found, socket_timeout=5)
    return _clients[key]


def require_client() -> redis.Redis:
    """The client, or an error that says how to configure one."""
    found = client()
    if found is None:
        raise SystemExit(
            "no control store: set WORKERS_CONTROL_URL=redis://... (the broker is not Redis)"
        )
    return found


def key(kind: str, name: str) -> str:
    """The control store key of one setting, e.g. `shop:fault:payment`."""
    return f"{PREFIX}:{kind}:{name}"


def record_done(
    service: str,
    task_id: str,
    sent_at: float | None,
    ok: bool,
    started_at: float | None = None,
) -> None:
    """Append one completion to the ledger that the demo and benchmarks read.

    `started_at` (epoch seconds) is when the task began to run, so that a reader can
    tell how many tasks ran at once; entries without it are older or from elsewhere.
    """
    store = client()
    if store is None or sent_at is None:
        return
    entry = {
        "service": service,
        "id": task_id,
        "sent_at": sent_at,
        "done_at": time.time(),
        "ok": ok,
    }
    if started_at is not None:
        entry["started_at"] = started_at
    store.rpush(LEDGER, json.dumps(entry))


def read_ledger(store: redis.Redis, start: int = 0) -> list[dict[str, Any]]:
    """Ledger entries from index `start` on."""
    return [json.loads(raw) for raw in store.lrange(LEDGER, start, -1)]
