"""The worker side of resizing, in its pure parts: when a shrink may release processes, and
the mean run time of a worker's latest tasks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from partitioner.supervisor.pool import RunTimes, releasable


@dataclass(frozen=True)
class Release:
    """A moment of a pending shrink and how many processes it may release then."""

    id: str
    excess: int
    idle: int
    unaccepted: int
    settled: bool
    released: int


RELEASES = [
    # id, excess, idle, unaccepted, settled: released
    Release("nothing to release", 0, 3, 0, True, released=0),
    Release("every process busy", 2, 0, 0, True, released=0),
    Release("idle ones cover the excess", 2, 3, 0, True, released=2),
    Release("fewer idle than the excess", 2, 1, 0, True, released=1),
    # A task written to a process and not yet accepted leaves that process looking idle.
    Release("a task not yet accepted", 2, 3, 1, True, released=0),
    Release("a process starts or ends", 2, 3, 0, False, released=0),
]


@pytest.mark.timeout(5)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in RELEASES])
def test_a_shrink_releases_only_idle_processes_in_a_settled_pool(case: Release) -> None:
    found = releasable(case.excess, case.idle, case.unaccepted, case.settled)

    assert found == case.released


@pytest.mark.timeout(5)
def test_run_time_is_the_mean_of_the_latest_tasks() -> None:
    runtimes = RunTimes(size=3)
    assert runtimes.mean_s is None

    for runtime_s in (10.0, 1.0, 2.0, 3.0):
        runtimes.add(runtime_s)

    assert runtimes.mean_s == pytest.approx(2.0)
