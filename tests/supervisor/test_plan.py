"""The planner keeps its invariants over random inputs, and shares capacity by backlog."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from partitioner.supervisor.plan import Demand, plan


@st.composite
def demands(draw: st.DrawFn) -> tuple[list[Demand], int]:
    count = draw(st.integers(1, 12))
    found = []
    for i in range(count):
        low = draw(st.integers(1, 4))
        high = draw(st.integers(low, 8))
        found.append(
            Demand(
                name=f"p{i}",
                min=low,
                max=high,
                current=draw(st.integers(low, high)),
                backlog=draw(st.integers(0, 50)),
                halted=draw(st.booleans()),
            )
        )
    budget = draw(st.integers(sum(d.min for d in found), sum(d.max for d in found) + 4))
    return found, budget


@given(demands(), st.dictionaries(st.sampled_from([f"p{i}" for i in range(12)]),
                                  st.floats(0, 30)))  # fmt: skip
def test_targets_stay_within_limits_and_budget(
    case: tuple[list[Demand], int], since: dict[str, float]
) -> None:
    found, budget = case
    targets = plan(found, budget, since).targets

    assert sum(targets.values()) <= budget
    for d in found:
        assert d.min <= targets[d.name] <= d.max
        if d.halted or d.backlog == 0:
            assert targets[d.name] == d.min, d


@given(demands())
def test_everyone_gets_what_they_want_when_the_budget_allows(
    case: tuple[list[Demand], int],
) -> None:
    found, budget = case
    assume(sum(d.wants for d in found) <= budget)
    assert plan(found, budget).targets == {d.name: d.wants for d in found}


@given(demands())
def test_no_capacity_is_left_idle_while_a_partition_wants_more(
    case: tuple[list[Demand], int],
) -> None:
    found, budget = case
    targets = plan(found, budget).targets
    if any(targets[d.name] < d.wants for d in found):
        assert sum(targets.values()) == budget


@given(demands())
def test_a_steady_load_gives_the_same_plan_again(case: tuple[list[Demand], int]) -> None:
    found, budget = case
    first = plan(found, budget).targets
    again = [Demand(d.name, d.min, d.max, first[d.name], d.backlog, d.halted) for d in found]
    second = plan(again, budget, {d.name: 0.0 for d in found})
    assert second.targets == first
    assert second.reasons == {}


def test_capacity_follows_backlog_and_leaves_a_halted_partition() -> None:
    shop = [
        Demand("order", 1, 4, current=1, backlog=0),
        Demand("payment", 1, 4, current=2, backlog=300, halted=True),
        Demand("inventory", 1, 4, current=1, backlog=30),
        Demand("notification", 1, 4, current=1, backlog=10),
    ]
    result = plan(shop, budget=6)
    assert result.targets == {"order": 1, "payment": 1, "inventory": 3, "notification": 1}
    assert result.reasons["payment"] == "2 -> 1: breaker halts it"
    assert result.reasons["inventory"] == "1 -> 3: backlog 30, limits 1..4, budget 6"


def test_a_busy_partition_in_cooldown_keeps_its_processes_while_there_is_room() -> None:
    busy = [Demand("order", 1, 4, current=3, backlog=2), Demand("payment", 1, 4, 1, 0)]
    assert plan(busy, 6, {"order": 5.0}, cooldown_s=10).targets["order"] == 3
    assert plan(busy, 6, {"order": 15.0}, cooldown_s=10).targets["order"] == 2


def test_min_above_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget 1"):
        plan([Demand("a", 1, 1, 1, 0), Demand("b", 1, 1, 1, 0)], budget=1)
