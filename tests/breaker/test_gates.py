"""The producer gate's decisions and the outcome classification, as pure logic."""

from __future__ import annotations

import time

import pytest
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded

from partitioner.breaker.board import Breakers
from partitioner.breaker.consumer import Reporter
from partitioner.breaker.machine import Outcome, State
from partitioner.breaker.producer import Admission, ProducerGate
from partitioner.breaker.stores.memory import MemoryStore
from partitioner.breaker.view import Seen
from partitioner.errors import PartitionOpen
from partitioner.settings import BreakerSettings, PartitionSettings, Settings
from partitioner.topology import Partition, Topology


class StubView:
    """A view that answers what the test put in it (None: the store is unreachable)."""

    def __init__(self) -> None:
        self.seen: dict[str, Seen | None] = {}

    def get(self, partition: str) -> Seen | None:
        return self.seen.get(partition)


def payment(**breaker: object) -> Partition:
    settings = Settings(
        broker_url="redis://127.0.0.1:6379/15",
        partitions={
            "payment": PartitionSettings(
                tasks=["shop.payment.*"],
                breaker=BreakerSettings(**breaker),  # type: ignore[arg-type]
            )
        },
    )
    return Topology.from_settings(settings).by_name["payment"]


def gate(partition: Partition) -> tuple[ProducerGate, StubView, MemoryStore]:
    store = MemoryStore()
    view = StubView()
    topology = Topology([partition], budget=1)
    breakers = Breakers(store, topology)
    return ProducerGate(breakers, view), view, store  # type: ignore[arg-type]


@pytest.mark.parametrize("state", [State.CLOSED, State.METRICS_ONLY, State.DISABLED], ids=str)
def test_flowing_states_route_to_the_partition_queue(state: State) -> None:
    p = payment()
    producer, view, _ = gate(p)
    view.seen["payment"] = Seen(state)
    assert producer.admit(p) == Admission("payment")


@pytest.mark.parametrize("state", [State.OPEN, State.FORCED_OPEN], ids=str)
def test_open_rejects_with_the_time_to_retry(state: State) -> None:
    p = payment()
    producer, view, _ = gate(p)
    view.seen["payment"] = Seen(state, open_until=time.monotonic() + 5)
    with pytest.raises(PartitionOpen) as raised:
        producer.admit(p)
    assert raised.value.partition == "payment"
    expected_s = 5 if state is State.OPEN else 1
    assert raised.value.retry_after_s == pytest.approx(expected_s, abs=0.1)
    assert f"breaker {state}" in str(raised.value)


def test_open_parks_when_on_open_is_park() -> None:
    p = payment(on_open="park")
    producer, view, _ = gate(p)
    view.seen["payment"] = Seen(State.OPEN, open_until=time.monotonic() + 5)
    assert producer.admit(p) == Admission("payment.parked")


def test_half_open_admits_exactly_the_probes_then_halts() -> None:
    # Given a breaker that the store has in half_open with 2 probes
    p = payment(half_open_probes=2, min_calls=1, window_calls=1, open_s=0.001, on_open="park")
    producer, view, store = gate(p)
    store.record("payment", p.policy, Outcome(failed=True))
    view.seen["payment"] = Seen(State.OPEN, open_until=time.monotonic())
    time.sleep(0.002)

    # When five tasks are published
    admissions = [producer.admit(p) for _ in range(5)]

    # Then two become probes and three are parked
    assert (
        admissions
        == [Admission("payment.probe", probe=store.breakers["payment"].period)] * 2
        + [Admission("payment.parked")] * 3
    )


@pytest.mark.parametrize(
    ("on_store_error", "on_open", "expected"),
    [
        pytest.param("allow", "reject", Admission("payment"), id="allow"),
        pytest.param("halt", "park", Admission("payment.parked"), id="halt-park"),
    ],
)
def test_unreachable_store_follows_on_store_error(
    on_store_error: str, on_open: str, expected: Admission
) -> None:
    p = payment(on_store_error=on_store_error, on_open=on_open)
    producer, view, _ = gate(p)
    view.seen["payment"] = None
    assert producer.admit(p) == expected


def test_unreachable_store_with_halt_and_reject_raises() -> None:
    p = payment(on_store_error="halt")
    producer, _, _ = gate(p)
    with pytest.raises(PartitionOpen, match="breaker store unreachable"):
        producer.admit(p)


def test_disabled_breaker_never_asks_the_view() -> None:
    p = payment(enabled=False)
    producer, view, _ = gate(p)
    view.seen["payment"] = Seen(State.FORCED_OPEN)
    assert producer.admit(p) == Admission("payment")


class GatewayDown(ConnectionError):
    """A dependency that cannot be reached: a subclass of a recorded base."""


class CardDeclined(ValueError):
    """A business error: not the dependency's fault."""


@pytest.mark.parametrize(
    ("record", "ignore", "exc", "failed"),
    [
        pytest.param([], [], None, False, id="success"),
        pytest.param([], [], GatewayDown(), True, id="any-exception-by-default"),
        pytest.param(["builtins.ConnectionError"], [], GatewayDown(), True, id="recorded-base"),
        pytest.param(["builtins.ConnectionError"], [], CardDeclined(), False, id="not-recorded"),
        pytest.param([], ["builtins.ValueError"], CardDeclined(), None, id="ignored"),
        pytest.param([], [], Retry(exc=GatewayDown()), True, id="retry-of-failure"),
        pytest.param(
            [], ["builtins.ConnectionError"], Retry(exc=GatewayDown()), None, id="retry-ignored"
        ),
        pytest.param(
            ["x.Y"],
            ["builtins.BaseException"],
            TimeLimitExceeded(),
            True,
            id="hard-time-limit-always",
        ),
        pytest.param(["x.Y"], [], SoftTimeLimitExceeded(), True, id="soft-time-limit-always"),
    ],
)
def test_outcome_classification(
    record: list[str], ignore: list[str], exc: BaseException | None, failed: bool | None
) -> None:
    p = payment(record=record, ignore=ignore)
    reporter = Reporter(Breakers(MemoryStore(), Topology([p], budget=1)), p)
    assert reporter.failed(exc) is failed


def test_slow_successes_and_probes_are_reported_as_such() -> None:
    p = payment(slow_call_s=0.5, min_calls=2, window_calls=2, slow_call_rate=1.0)
    store = MemoryStore()
    reporter = Reporter(Breakers(store, Topology([p], budget=1)), p)

    reporter.report(None, runtime_s=0.6, probe=0)
    reporter.report(None, runtime_s=0.7, probe=0)

    assert store.breakers["payment"].state is State.OPEN
