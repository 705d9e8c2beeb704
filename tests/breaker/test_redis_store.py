"""The Redis store runs the same rules as the pure machine, atomically, on Redis's clock."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.breaker.machine import Breaker, Outcome, Policy, State
from partitioner.breaker.stores.memory import MemoryStore
from partitioner.breaker.stores.redis import RedisStore

DB = 13


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis(db=DB)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# probe=1 stands for "a probe of the current half-open period"; the test fills in its id.
outcomes = st.builds(
    Outcome, failed=st.booleans(), slow=st.booleans(), probe=st.sampled_from([0, 1, 7])
)
ops = st.one_of(
    st.tuples(st.just("record"), outcomes),
    st.tuples(st.just("claim"), st.none()),
    st.tuples(st.just("set"), st.sampled_from([State.CLOSED, State.METRICS_ONLY])),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(ops, max_size=40),
    window=st.sampled_from(["count", "time"]),
    probes=st.integers(1, 3),
)
def test_redis_store_agrees_with_the_pure_machine(
    steps: list[tuple[str, object]], window: str, probes: int
) -> None:
    # Given the same policy, and the memory store driven by the Redis server's clock,
    client = redis.Redis(db=DB)
    client.flushdb()
    store = RedisStore(client, "agree")
    policy = Policy(
        window=window,  # type: ignore[arg-type]
        window_calls=6,
        window_ms=60_000,
        min_calls=3,
        slow_call_ms=100,
        open_ms=0,  # open periods end at once, so half_open is reached within a test
        half_open_probes=probes,
    )
    now = {"ms": 0}
    memory = MemoryStore(clock=lambda: now["ms"])

    # when every step runs on both,
    for op, arg in steps:
        if op == "record":
            assert isinstance(arg, Outcome)
            if arg.probe == 1:
                arg = Outcome(
                    arg.failed, arg.slow, probe=memory.breakers.get("p", Breaker()).period
                )
            remote = store.record("p", policy, arg)
            now["ms"] = remote.now_ms
            local = memory.record("p", policy, arg)
        elif op == "claim":
            remote, granted = store.claim("p", policy)
            now["ms"] = remote.now_ms
            local, local_granted = memory.claim("p", policy)
            assert granted == local_granted
        else:
            assert isinstance(arg, State)
            remote = store.set("p", arg, "test")
            now["ms"] = remote.now_ms
            local = memory.set("p", arg, "test")

        # then both hold the same breaker after each.
        assert (
            remote.state, remote.counts, remote.reopens, remote.permits, remote.probe_ok,
            remote.period, remote.until_ms,
        ) == (
            local.state, local.counts, local.reopens, local.permits, local.probe_ok,
            local.period, local.until_ms,
        )  # fmt: skip
    client.close()


def test_half_open_admits_exactly_the_probes_across_racing_clients(
    client: redis.Redis,
) -> None:
    # Given a breaker in half_open with 3 probes,
    policy = Policy(min_calls=1, open_ms=0, half_open_probes=3)
    RedisStore(client, "race").record("pay", policy, Outcome(failed=True))

    # when 8 clients claim 50 permits each at once,
    def claims(_: int) -> int:
        store = RedisStore(redis.Redis(db=DB), "race")
        return sum(store.claim("pay", policy)[1] for _ in range(50))

    with ThreadPoolExecutor(8) as pool:
        granted = sum(pool.map(claims, range(8)))

    # then exactly 3 are granted.
    assert granted == 3


def test_open_period_is_timed_by_the_server_clock_in_ms(client: redis.Redis) -> None:
    store = RedisStore(client, "timing")
    policy = Policy(min_calls=1, open_ms=500)
    opened = store.record("pay", policy, Outcome(failed=True))
    assert opened.state is State.OPEN
    assert opened.until_ms - opened.now_ms == 500
    assert 0.45 < opened.open_left_s <= 0.5


def test_transitions_are_published_once(client: redis.Redis) -> None:
    store = RedisStore(client, "pub")
    pubsub = client.pubsub()
    pubsub.subscribe(store.channel)
    assert pubsub.get_message(timeout=1)  # the subscribe confirmation

    policy = Policy(min_calls=2)
    for _ in range(5):
        store.record("pay", policy, Outcome(failed=True))

    messages = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        messages.append(message)
    assert len(messages) == 1
    assert b'"new":"open"' in messages[0]["data"]
    pubsub.close()


def test_keys_expire_but_states_set_by_hand_do_not(client: redis.Redis) -> None:
    store = RedisStore(client, "ttl")
    policy = Policy(min_calls=100)
    store.record("pay", policy, Outcome(failed=random.random() < 0.5))
    state_key, count_key, _ = store.keys("pay")
    assert 0 < client.pttl(state_key) <= 2 * 300_000 + 60_000
    assert client.pttl(count_key) > 0

    store.set("pay", State.FORCED_OPEN, "by hand")
    assert client.pttl(state_key) == -1
