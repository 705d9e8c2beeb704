"""The leader's lease and the shared record, on a real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from partitioner.supervisor.lease import Lease
from partitioner.supervisor.record import DECISIONS_KEPT, Decision, HostInfo, RedisRecord

STORE_URL = "redis://127.0.0.1:6379/9"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    found = redis.Redis.from_url(STORE_URL, socket_timeout=5)
    yield found
    found.close()


@pytest.fixture
def record(client: redis.Redis) -> Iterator[RedisRecord]:
    found = RedisRecord(client, f"test-{uuid.uuid4().hex[:8]}")
    yield found
    keys = list(client.scan_iter(f"{found.prefix}:*"))
    if keys:
        client.delete(*keys)


def test_one_holder_at_a_time_and_the_next_after_a_release(record: RedisRecord) -> None:
    first, second = record.lease("a", 5000), record.lease("b", 5000)

    assert first.hold() and first.hold()  # taken, then renewed
    assert not second.hold()
    assert record.leader() == "a"

    second.release()  # not the holder: changes nothing
    assert record.leader() == "a"
    first.release()
    assert second.hold()
    assert record.leader() == "b"


def test_a_holder_that_stops_renewing_loses_the_lease_when_it_expires(
    record: RedisRecord,
) -> None:
    dead, alive = record.lease("a", 200), record.lease("b", 200)
    assert dead.hold()

    deadline = time.monotonic() + 2
    while not alive.hold():
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.02)
    # The old holder cannot take it back, nor delete it.
    assert not dead.hold()
    dead.release()
    assert record.leader() == "b"


def test_hosts_are_those_whose_heartbeat_has_not_expired(record: RedisRecord) -> None:
    record.heartbeat(HostInfo("a", 4, {"mail": "mail@a"}, []), ttl_ms=5000)
    record.heartbeat(HostInfo("b", 2, {}, ["pay"]), ttl_ms=100)
    assert [h.name for h in record.hosts()] == ["a", "b"]

    time.sleep(0.2)

    assert record.hosts() == [HostInfo("a", 4, {"mail": "mail@a"}, [])]
    record.forget("a")
    assert record.hosts() == []


def test_the_plan_and_the_newest_decisions_are_kept(record: RedisRecord) -> None:
    leader, other = record.lease("a", 5000), record.lease("b", 5000)
    assert leader.hold()
    assert record.set_plan({"a": {"mail": 3, "pay": 1}}, leader)
    # A host that does not hold the lease cannot publish a plan.
    assert not record.set_plan({"a": {"mail": 0, "pay": 4}}, other)
    assert record.plan() == {"a": {"mail": 3, "pay": 1}}

    made = [Decision(float(i), "a", "mail", i, i + 1, f"step {i}") for i in range(60)]
    record.add_decisions(made[:30])
    record.add_decisions(made[30:])

    kept = record.decisions(100)
    assert len(kept) == DECISIONS_KEPT
    assert kept[0] == made[-1]  # newest first
    assert str(kept[0]) == "mail@a 59 -> 60: step 59"


def test_a_hold_sets_the_holder_and_the_time_to_live(client: redis.Redis) -> None:
    key = f"test-lease-{uuid.uuid4().hex[:8]}"
    lease = Lease(client, key, "a", 1000)
    try:
        assert lease.hold()
        assert 0 < client.pttl(key) <= 1000
        assert client.get(key) == b"a"
    finally:
        client.delete(key)
