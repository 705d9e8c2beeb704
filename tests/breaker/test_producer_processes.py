"""The producer gate in many processes at once, against real Redis (no workers).

Each producer is a process of its own (`tests.breaker.publisher`) with Partitioner attached
from `PARTITIONER_*` variables, publishing through Celery's router, as a web server's
processes would.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from partitioner.breaker.machine import Outcome, State
from partitioner.breaker.producer import PROBE_HEADER
from partitioner.breaker.stores.redis import RedisStore
from partitioner.settings import BreakerSettings, PartitionSettings, Settings
from partitioner.topology import Partition, Topology
from tests.breaker import publisher

DB = 8
BROKER_URL = f"redis://127.0.0.1:6379/{DB}"
PRODUCERS = 8
PER_PRODUCER = 40
INTERVAL_S = 0.01
PROBES = 3
OPEN_S = 1.0
# The producers start this long before the open period ends, so that they all race for
# the permits the moment the breaker turns half-open.
LEAD_S = 0.2


@dataclass(frozen=True)
class Names:
    """The test's own application and partition names, so that neither its breaker keys
    nor its queues meet another test's."""

    namespace: str
    partition: str

    @property
    def queue(self) -> str:
        return self.partition


@pytest.fixture
def names() -> Iterator[Names]:
    """Names of the test's own; its keys and queues are removed after it."""
    suffix = uuid.uuid4().hex[:8]
    found = Names(f"producers-{suffix}", f"charge_{suffix}")
    yield found
    with redis.Redis.from_url(BROKER_URL) as client:
        patterns = (f"partitioner:{found.namespace}:*", f"{found.queue}*", f"*.{found.queue}*")
        keys = [key for pattern in patterns for key in client.scan_iter(pattern)]
        if keys:
            client.delete(*keys)


def partition(names: Names, breaker: dict[str, Any]) -> Partition:
    settings = Settings(
        broker_url=BROKER_URL,
        partitions={
            names.partition: PartitionSettings(
                tasks=["shop.payment.*"], breaker=BreakerSettings(**breaker)
            )
        },
    )
    return Topology.from_settings(settings).by_name[names.partition]


def producer_env(names: Names, breaker: dict[str, Any]) -> dict[str, str]:
    prefix = f"PARTITIONER_PARTITIONS__{names.partition.upper()}__"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTITIONER_")}
    env |= {
        "PARTITIONER_BROKER_URL": BROKER_URL,
        "PARTITIONER_NAME": names.namespace,
        f"{prefix}TASKS": "shop.payment.*",
    }
    for key, value in breaker.items():
        env[f"{prefix}BREAKER__{key.upper()}"] = str(value)
    return env


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on_open", ["reject", "park"])
def test_half_open_admits_exactly_the_probes_across_eight_processes(
    names: Names, on_open: str
) -> None:
    # Given 8 producer processes ready to publish payment tasks, 40 each, 10 ms apart
    breaker = {
        "min_calls": 2,
        "window_calls": 2,
        "open_s": OPEN_S,
        "half_open_probes": PROBES,
        "on_open": on_open,
    }
    env = producer_env(names, breaker)
    processes = [publisher.start(env, PER_PRODUCER, INTERVAL_S) for _ in range(PRODUCERS)]
    publisher.wait_ready(processes)

    # And the breaker just tripped
    client = redis.Redis.from_url(BROKER_URL)
    store = RedisStore(client, names.namespace)
    p = partition(names, breaker)
    store.record(p.name, p.policy, Outcome(failed=True))
    opened = store.record(p.name, p.policy, Outcome(failed=True))
    assert opened.state is State.OPEN

    # When they all publish, from just before it turns half-open until well after
    half_open_at = opened.until_ms / 1000
    publisher.release(processes, half_open_at - LEAD_S)
    reports = [publisher.report(process) for process in processes]
    assert all(r["started"] < half_open_at < r["finished"] - 0.1 for r in reports), reports

    # Then exactly 3 tasks across all processes became probes, each marked with the
    # half-open period that admitted it
    routed = Counter(queue for r in reports for queue in r["queues"].values())
    rejected = sum(len(r["retry_after_s"]) for r in reports)
    total = PRODUCERS * PER_PRODUCER
    snapshot = store.snapshot(p.name, p.policy)
    assert routed[p.probe_queue] == PROBES
    probes = [json.loads(raw) for raw in client.lrange(p.probe_queue, 0, -1)]
    assert [m["headers"][PROBE_HEADER] for m in probes] == [snapshot.period] * PROBES

    # And none went to the partition's queue; every other one was rejected or parked
    assert routed[p.queue] == 0
    assert client.llen(p.queue) == 0
    if on_open == "park":
        assert (routed[p.parking_queue], rejected) == (total - PROBES, 0)
        assert client.llen(p.parking_queue) == total - PROBES
    else:
        assert (routed[p.parking_queue], rejected) == (0, total - PROBES)

    # And the store agrees: half-open, its permits all claimed and none beyond
    assert (snapshot.state, snapshot.permits) == (State.HALF_OPEN, PROBES)
    client.close()
