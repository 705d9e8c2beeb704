"""Topology: the most specific pattern routes a task name, and ties are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner.errors import RoutingError
from partitioner.settings import PartitionSettings, Settings
from partitioner.topology import Partition, Topology, specificity


def partition(name: str, *patterns: str, queues: tuple[str, ...] = ()) -> Partition:
    return Partition(
        name=name,
        patterns=patterns,
        queues=queues or (name,),
        min=1,
        max=1,
        concurrency=1,
        prefetch=1,
        pool="prefork",
    )


def topology(*partitions: Partition) -> Topology:
    return Topology(partitions, budget=len(partitions))


SHOP = topology(
    partition("refund", "shop.payment.refund"),
    partition("payment", "shop.payment.*"),
    partition("shop", "shop.*"),
    partition("slow", "shop.payment.slow_?"),
    partition("bulk", "shop.[ab]ulk.*"),
)

ROUTES = [
    ("exact beats every glob", "shop.payment.refund", "refund", "shop.payment.refund"),
    ("longer glob beats shorter", "shop.payment.charge", "payment", "shop.payment.*"),
    ("only the broad glob matches", "shop.order.create", "shop", "shop.*"),
    ("? is a wildcard", "shop.payment.slow_1", "slow", "shop.payment.slow_?"),
    ("[ab] is a wildcard", "shop.bulk.import", "bulk", "shop.[ab]ulk.*"),
]


@pytest.mark.parametrize(
    ("task", "expected", "pattern"),
    [case[1:] for case in ROUTES],
    ids=[case[0] for case in ROUTES],
)
def test_most_specific_pattern_wins(task: str, expected: str, pattern: str) -> None:
    route = SHOP.route(task)

    assert route.partition.name == route.queue == expected
    assert route.pattern == pattern


SPECIFICITY = [
    ("exact name", "shop.payment.charge", (1, 19)),
    ("star", "shop.payment.*", (0, 13)),
    ("question mark", "shop.payment.c?", (0, 14)),
    ("character class", "shop.[ab]ulk.*", (0, 9)),
]


@pytest.mark.parametrize(
    ("pattern", "key"),
    [case[1:] for case in SPECIFICITY],
    ids=[case[0] for case in SPECIFICITY],
)
def test_specificity_counts_literal_characters(pattern: str, key: tuple[int, ...]) -> None:
    assert specificity(pattern) == key


WORDS = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@given(st.lists(WORDS, min_size=2, max_size=5))
def test_an_exact_name_beats_any_glob_that_matches_it(parts: list[str]) -> None:
    task = ".".join(parts)
    globs = [".".join(parts[:i]) + ".*" for i in range(1, len(parts))]
    prefixes = [partition(f"p{i}", glob) for i, glob in enumerate(globs)]
    routes = topology(partition("exact", task), *prefixes)

    assert routes.route(task).partition.name == "exact"


def test_tie_across_partitions_names_both() -> None:
    # Both patterns keep 12 literal characters.
    tied = topology(
        partition("payment", "shop.*.cancel"),
        partition("order", "shop.orders.*"),
    )

    with pytest.raises(RoutingError) as raised:
        tied.route("shop.orders.cancel")

    message = str(raised.value)
    assert "'shop.orders.cancel'" in message
    assert "'shop.*.cancel' of partition 'payment'" in message
    assert "'shop.orders.*' of partition 'order'" in message


def test_tie_within_one_partition_is_not_an_error() -> None:
    routes = topology(partition("order", "shop.*.cancel", "shop.orders.*"))

    assert routes.route("shop.orders.cancel").partition.name == "order"


def test_default_partition_catches_unmatched_names() -> None:
    routes = topology(partition("payment", "shop.payment.*"), partition("default"))

    route = routes.route("shop.order.create")

    assert route.partition.name == route.queue == "default"
    assert route.pattern is None
    assert routes.route("shop.payment.charge").partition.name == "payment"


def test_no_default_names_the_task_and_the_setting() -> None:
    routes = topology(partition("payment", "shop.payment.*"))

    with pytest.raises(RoutingError) as raised:
        routes.route("shop.order.create")

    assert "'shop.order.create'" in str(raised.value)
    assert "partitions.<name>.tasks" in str(raised.value)


@pytest.mark.usefixtures("hermetic")
def test_queues_default_to_the_partition_name_and_explicit_ones_are_kept() -> None:
    settings = Settings(
        partitions={
            "payment": PartitionSettings(tasks=["shop.payment.*"]),
            "order": PartitionSettings(tasks=["shop.order.*"], queues=["orders", "bulk"]),
        }
    )

    routes = Topology.from_settings(settings)

    assert routes.by_name["payment"].queues == ("payment",)
    assert routes.by_name["order"].queues == ("orders", "bulk")
    assert routes.route("shop.order.create").queue == "orders"
    assert routes.queues == (
        "payment", "payment.probe", "payment.parked", "orders", "bulk", "order.probe",
        "order.parked",
    )  # fmt: skip
    assert routes.partition_of_queue("bulk") is routes.by_name["order"]
    assert routes.partition_of_queue("nobody") is None


def test_route_cache_returns_the_same_route() -> None:
    routes = topology(partition("payment", "shop.payment.*"))

    first = routes.route("shop.payment.charge")

    assert routes.route("shop.payment.charge") is first
    assert routes.route("shop.payment.refund") is not first


def test_worker_name_is_partition_at_host() -> None:
    assert partition("payment").worker_name("box1") == "payment@box1"
