"""The breaker view against real Redis: it follows the published transitions, and a dropped
subscription (a reconnect, `CLIENT KILL`) does not make it forget the breakers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from partitioner.breaker.board import Breakers
from partitioner.breaker.machine import State
from partitioner.breaker.stores.redis import RedisStore
from partitioner.breaker.view import BreakerView
from partitioner.settings import PartitionSettings, Settings
from partitioner.topology import Topology

URL = "redis://127.0.0.1:6379/8"
# Long enough that only the subscription, not a refresh, can bring news within a test.
REFRESH_S = 5.0


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    """A client of the tests' own; the breaker keys of every `name()` are removed after."""
    client = redis.Redis.from_url(URL)
    yield client
    keys = list(client.scan_iter("partitioner:view-test-*"))
    if keys:
        client.delete(*keys)
    client.close()


def name() -> str:
    """An application name of its own, also the client name of the view's connections."""
    return f"view-test-{uuid.uuid4().hex[:8]}"


def subscribers(admin: redis.Redis, channel: str) -> int:
    return int(admin.pubsub_numsub(channel)[0][1])


def forced_open_view(name: str) -> tuple[BreakerView, Breakers, Topology]:
    """A view (not started yet) of payment's breaker, which is forced open."""
    settings = Settings(partitions={"payment": PartitionSettings(tasks=["shop.*"])})
    topology = Topology.from_settings(settings)
    store = RedisStore(redis.Redis.from_url(URL, client_name=name), name)
    breakers = Breakers(store, topology)
    breakers.set(topology.by_name["payment"], State.FORCED_OPEN, "test")
    return (
        BreakerView(breakers, store.client, store.channel, refresh_s=REFRESH_S),
        breakers,
        topology,
    )


THREADS = 16
ROUNDS = 5


def ask_at_once(view: BreakerView) -> list[State | None]:
    """What `THREADS` threads get when they ask `view` for payment at the same moment."""
    barrier = threading.Barrier(THREADS)

    def ask(_: int) -> State | None:
        barrier.wait()
        found = view.get("payment")
        return found.state if found is not None else None

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(ask, range(THREADS)))


@pytest.mark.timeout(30)
def test_threads_asking_a_new_view_at_once_all_see_the_breaker(admin: redis.Redis) -> None:
    for _ in range(ROUNDS):
        # Given a breaker forced open, and a view of it that nothing has asked yet
        view, _, _ = forced_open_view(name())

        # When 16 threads of a producer ask it at the same moment, as their first publish
        answers = ask_at_once(view)

        # Then every one sees it forced open; none takes the store for unreachable
        assert answers == [State.FORCED_OPEN] * THREADS
        view.stop()


@pytest.mark.timeout(30)
def test_view_keeps_the_breakers_across_a_killed_subscription(admin: redis.Redis) -> None:
    # Given a view of payment's breaker, forced open, whose connections all carry one name
    namespace = name()
    view, breakers, topology = forced_open_view(namespace)
    payment = topology.by_name["payment"]
    seen = view.get("payment")
    assert seen is not None and seen.state is State.FORCED_OPEN
    deadline = time.monotonic() + 5
    while subscribers(admin, view.channel) < 1:
        assert time.monotonic() < deadline, "the view never subscribed"
        time.sleep(0.01)

    # When every connection of the view is killed
    killed = [c["id"] for c in admin.client_list() if c["name"] == namespace]
    for client_id in killed:
        admin.client_kill_filter(_id=client_id)

    # Then for a second it never forgets the breaker, nor calls the store unreachable
    states = set()
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        found = view.get("payment")
        states.add(found.state if found is not None else None)
        time.sleep(0.002)
    assert states == {State.FORCED_OPEN}
    assert breakers.health.reachable

    # And it subscribed again: a transition reaches it long before its next refresh
    assert subscribers(admin, view.channel) == 1
    Breakers(RedisStore(admin, namespace), topology).set(payment, State.CLOSED, "test")
    deadline = time.monotonic() + 1.0
    while (found := view.get("payment")) is None or found.state is not State.CLOSED:
        assert time.monotonic() < deadline, f"the view still sees {found}"
        time.sleep(0.01)
    view.stop()
