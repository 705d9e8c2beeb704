"""The planner keeps its invariants over random inputs, and shares capacity by backlog."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from partitioner.supervisor.plan import Demand, Host, plan, plan_cluster, stage


@st.composite
def demands(draw: st.DrawFn) -> tuple[list[Demand], int]:
    count = draw(st.integers(1, 12))
    found = []
    for i in range(count):
        low = draw(st.integers(0, 4))
        high = draw(st.integers(max(low, 1), 8))
        found.append(
            Demand(
                name=f"p{i}",
                min=low,
                max=high,
                current=draw(st.integers(low, high)),
                backlog=draw(st.integers(0, 50)),
                halted=draw(st.booleans()),
                probing=draw(st.booleans()),
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
        elif d.probing:
            assert targets[d.name] <= max(d.min, 1), d  # probes need one process, no more


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
def test_every_partition_with_backlog_runs_while_the_budget_allows(
    case: tuple[list[Demand], int],
) -> None:
    found, budget = case
    waiting = [d for d in found if d.wants > 0]
    assume(
        sum(max(d.min, 1) for d in waiting) + sum(d.min for d in found if d.wants == 0) <= budget
    )
    targets = plan(found, budget).targets
    assert all(targets[d.name] >= 1 for d in waiting)


@given(demands())
def test_a_steady_load_gives_the_same_plan_again(case: tuple[list[Demand], int]) -> None:
    found, budget = case
    first = plan(found, budget).targets
    again = [replace(d, current=first[d.name]) for d in found]
    second = plan(again, budget, {d.name: 0.0 for d in found})
    assert second.targets == first
    assert second.reasons == {}


def test_backlogs_trading_places_within_the_cooldown_move_nothing() -> None:
    first = plan([Demand("a", 0, 4, 1, 11), Demand("b", 0, 4, 1, 9)], budget=4).targets
    assert first == {"a": 3, "b": 1}
    sizes = {"a": 3, "b": 1}
    for backlog_a, backlog_b in [(9, 11), (11, 9), (9, 11)]:
        demands = [
            Demand("a", 0, 4, sizes["a"], backlog_a),
            Demand("b", 0, 4, sizes["b"], backlog_b),
        ]
        assert plan(demands, 4, {"a": 0.5, "b": 0.5}, cooldown_s=10).targets == sizes
    # After the cooldown, capacity follows the backlog again.
    demands = [Demand("a", 0, 4, 3, 2), Demand("b", 0, 4, 1, 30)]
    assert plan(demands, 4, {"a": 11.0, "b": 11.0}, cooldown_s=10).targets == {"a": 1, "b": 3}


def test_a_new_backlog_gets_a_process_even_while_others_hold_theirs() -> None:
    demands = [Demand("a", 0, 4, 4, 50), Demand("b", 0, 4, 0, 1)]
    assert plan(demands, 4, {"a": 1.0}, cooldown_s=10).targets == {"a": 3, "b": 1}


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


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Host], dict[str, int], int | None]:
    shape, _ = draw(demands())
    hosts = []
    for h in range(draw(st.integers(1, 4))):
        mine = [
            Demand(d.name, d.min, d.max, draw(st.integers(d.min, d.max)), 0, d.halted)
            for d in shape
        ]
        floor = sum(d.min for d in shape)
        hosts.append(Host(f"h{h}", draw(st.integers(floor, floor + 10)), mine))
    backlog = {d.name: draw(st.integers(0, 60)) for d in shape}
    mins = sum(d.min for d in shape) * len(hosts)
    cluster = draw(st.none() | st.integers(mins, mins + 20))
    return hosts, backlog, cluster


@given(clusters())
def test_every_host_and_the_cluster_stay_within_their_budgets(
    case: tuple[list[Host], dict[str, int], int | None],
) -> None:
    hosts, backlog, cluster = case
    plans = plan_cluster(hosts, backlog, cluster)

    for host in hosts:
        targets = plans[host.name].targets
        assert sum(targets.values()) <= host.budget
        for d in host.demands:
            assert d.min <= targets[d.name] <= d.max
    total = sum(sum(p.targets.values()) for p in plans.values())
    if cluster is not None:
        assert total <= cluster
    # No host takes capacity for backlog that other hosts already cover.
    for name, waiting in backlog.items():
        above_min = sum(
            plans[h.name].targets[name] - next(d.min for d in h.demands if d.name == name)
            for h in hosts
        )
        assert above_min <= waiting


def test_backlog_beyond_one_hosts_max_spills_to_the_next_host() -> None:
    shape = [Demand("mail", 0, 2, 0, 0), Demand("pay", 1, 2, 1, 0)]
    hosts = [Host("a", 3, shape), Host("b", 3, shape)]

    plans = plan_cluster(hosts, {"mail": 3, "pay": 0})

    assert plans["a"].targets == {"mail": 2, "pay": 1}
    assert plans["b"].targets == {"mail": 1, "pay": 1}
    assert plan_cluster(hosts, {"mail": 3, "pay": 0}, cluster_budget=4)["b"].targets == {
        "mail": 0,
        "pay": 1,
    }


@st.composite
def changes(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, int], dict[str, int], int]:
    names = [f"p{i}" for i in range(draw(st.integers(1, 8)))]
    budget = draw(st.integers(1, 16))
    current = _within(draw, names, budget)
    targets = _within(draw, names, budget)
    held = {p: draw(st.integers(0, current[p])) for p in names}
    return targets, current, held, budget


def _within(draw: st.DrawFn, names: list[str], budget: int) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for p in names:
        sizes[p] = draw(st.integers(0, budget - sum(sizes.values())))
    return sizes


@given(changes())
def test_a_change_never_runs_more_tasks_at_once_than_the_budget(
    case: tuple[dict[str, int], dict[str, int], dict[str, int], int],
) -> None:
    targets, current, held, budget = case
    staged = stage(targets, current, held, budget)

    assert sum(max(staged[p], held[p]) for p in targets) <= budget
    for p, target in targets.items():
        if target <= current[p]:
            assert staged[p] == target  # a shrink is never held back
        else:
            assert current[p] <= staged[p] <= target
    # Once the shrinking pools' tasks have ended, every target is reached.
    assert stage(targets, staged, {p: 0 for p in targets}, budget) == targets


def test_growth_waits_for_the_tasks_of_a_shrinking_pool() -> None:
    targets = {"mail": 3, "pay": 1}
    staged = stage(targets, current={"mail": 1, "pay": 3}, held={"mail": 1, "pay": 3}, budget=4)
    assert staged == {"mail": 1, "pay": 1}
    staged = stage(targets, current=staged, held={"mail": 1, "pay": 2}, budget=4)
    assert staged == {"mail": 2, "pay": 1}
