"""The supervisor's control step: observe, plan, and say what each host's pools should be.

Every host's launcher calls `step()` once per `supervisor.interval_s`. Each step writes the
host's heartbeat (its budget, running workers, degraded partitions); the host holding the
leader's lease then observes every partition on every host, plans within the limits and
budgets, stages the change so that tasks still running in shrinking pools keep the budget,
logs each change of plan once with its figures, and publishes the plan. Each host applies
its own part of the plan (see `partitioner.launch`), the leader in the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from partitioner.app import Partitioner
from partitioner.breaker.machine import State
from partitioner.errors import BrokerError
from partitioner.observe import PartitionObservation, observe
from partitioner.supervisor.plan import Demand, Host, plan_cluster, stage, why
from partitioner.supervisor.record import (
    Decision,
    HostInfo,
    HostPlans,
    LocalRecord,
    Record,
    RedisRecord,
)

log = logging.getLogger(__name__)

DECISIONS_SHOWN = 10
# Breaker states in which a partition runs none of its tasks. Half-open, it runs probes.
HALTING = (State.OPEN, State.FORCED_OPEN)


def record_for(partitioner: Partitioner) -> Record:
    """The shared record in the state store, or this host's own without one."""
    client = partitioner.state_client()
    if client is None:
        return LocalRecord(partitioner.settings.state_dir)
    return RedisRecord(client, partitioner.settings.name)


def saved_record(partitioner: Partitioner) -> Record | None:
    """The record as the launchers left it: in the state store, or this folder's file."""
    if partitioner.state_client() is None:
        return LocalRecord.read(partitioner.settings.state_dir)
    return record_for(partitioner)


def supervisor_status(partitioner: Partitioner) -> dict[str, Any]:
    """The leader, hosts, plan and latest decisions, for `status`; empty without any."""
    settings = partitioner.settings
    found: dict[str, Any] = {
        "enabled": settings.supervisor.enabled,
        "interval_s": settings.supervisor.interval_s,
        "cluster_budget": settings.cluster_budget,
        "leader": None,
        "hosts": [],
        "plan": {},
        "decisions": [],
    }
    record = saved_record(partitioner)
    if record is None:
        return found
    try:
        found["leader"] = record.leader()
        found["hosts"] = [asdict(h) for h in record.hosts()]
        found["plan"] = record.plan()
        found["decisions"] = [asdict(d) for d in record.decisions(DECISIONS_SHOWN)]
    except redis.RedisError as exc:
        found["error"] = f"cannot reach the state store: {exc}"
    return found


@dataclass
class Pools:
    """What one host runs: worker by partition, and the partitions that crash-loop."""

    workers: dict[str, str]
    degraded: list[str]


class Supervisor:
    """One host's supervisor; it plans for every host while it holds the lease."""

    def __init__(self, partitioner: Partitioner, host: str, record: Record) -> None:
        self.partitioner = partitioner
        self.host = host
        self.record = record
        self.lease = record.lease(host, self._lease_ms)
        self.leading = False
        # By (host, partition): the planned size, the size staged last, when the plan changed.
        self.planned: dict[tuple[str, str], int] = {}
        self.staged: dict[tuple[str, str], int] = {}
        self.changed_at: dict[tuple[str, str], float] = {}
        self._failing = False
        self._resume_at = 0.0
        self._warned_cluster = False

    @property
    def _lease_ms(self) -> int:
        return round(self.partitioner.settings.supervisor.lease_s * 1000)

    def step(self, pools: Pools, now: float | None = None) -> dict[str, int] | None:
        """One control step; the sizes this host's pools should have, if known yet.

        While the broker or the state store does not answer, it tries again only once a
        lease period has passed, so that the launcher's loop is not held up every step.
        """
        now = time.monotonic() if now is None else now
        if now < self._resume_at:
            return None
        budget = self.partitioner.topology.budget
        try:
            self.record.heartbeat(
                HostInfo(self.host, budget, pools.workers, pools.degraded), self._lease_ms
            )
            # The leader applies what it planned; the others read it.
            plan = self._plan(now) if self._lead() else self.record.plan()
            mine = plan.get(self.host)
        except (redis.RedisError, BrokerError) as exc:
            self._fail(exc, now)
            return None
        if self._failing:
            log.info("supervisor: the broker and the state store answer again")
            self._failing = False
        return mine

    def close(self) -> None:
        """Give up the lead and this host's heartbeat at once, so another host takes over."""
        try:
            if self.lease is not None and self.leading:
                self.lease.release()
            self.record.forget(self.host)
        except redis.RedisError as exc:
            log.warning("supervisor: could not give up the lead cleanly: %s", exc)

    def _fail(self, exc: Exception, now: float) -> None:
        if not self._failing:
            log.warning(
                "supervisor: cannot reach the broker or the state store (%s); pools keep "
                "their sizes, and it tries again every %g s",
                exc, self.partitioner.settings.supervisor.lease_s,
            )  # fmt: skip
        self._failing = True
        self._resume_at = now + self.partitioner.settings.supervisor.lease_s
        # A leader that cannot observe lets another host try.
        if self.leading and self.lease is not None:
            with suppress(redis.RedisError):
                self.lease.release()
        self.leading = False

    def _lead(self) -> bool:
        leading = self.lease is None or self.lease.hold()
        if leading != self.leading:
            if leading:
                log.info("supervisor: %s leads; it plans for every host", self.host)
            else:
                log.info("supervisor: %s follows %s", self.host, self.record.leader())
        self.leading = leading
        return leading

    def _plan(self, now: float) -> HostPlans:
        settings = self.partitioner.settings
        hosts = {h.name: h for h in self.record.hosts()}
        expected = sum(len(h.workers) for h in hosts.values())
        timeout_s = min(1.0, settings.supervisor.interval_s)
        observations = observe(self.partitioner, timeout_s=timeout_s, expected=expected)
        pools = _pools_by_host(observations)
        shapes = self._shapes(hosts, pools, observations)
        self._check_cluster_budget(shapes)
        backlog = {o.name: o.backlog for o in observations}
        since = {key: now - at for key, at in self.changed_at.items()}
        plans = plan_cluster(
            shapes, backlog, settings.cluster_budget, since, settings.supervisor.cooldown_s
        )
        decisions = self._decide(shapes, plans, backlog, hosts, now)
        staged = {
            shape.name: self._stage(shape, plans[shape.name].targets, pools) for shape in shapes
        }
        for decision in decisions:
            log.info("supervisor: %s", decision)
        self.record.add_decisions(decisions)
        if not self.record.set_plan(staged, self.lease):
            log.warning("supervisor: %s lost the lead while planning; plan dropped", self.host)
            return self.record.plan()
        return staged

    def _shapes(
        self,
        hosts: Mapping[str, HostInfo],
        pools: Mapping[str, Mapping[str, Mapping[str, Any]]],
        observations: list[PartitionObservation],
    ) -> list[Host]:
        states = {o.name: _state(o.breaker) for o in observations}
        shapes = []
        for name, info in sorted(hosts.items()):
            seen = pools.get(name, {})
            demands = [
                Demand(
                    name=p.name,
                    min=p.min,
                    max=p.max,
                    current=self._current(name, p.name, seen.get(p.name), p.concurrency),
                    backlog=0,
                    halted=states.get(p.name) in HALTING or p.name in info.degraded,
                    probing=states.get(p.name) is State.HALF_OPEN,
                )
                for p in self.partitioner.topology.partitions
            ]
            shapes.append(Host(name, info.budget, demands))
        return shapes

    def _check_cluster_budget(self, shapes: list[Host]) -> None:
        cluster_budget = self.partitioner.settings.cluster_budget
        mins = sum(d.min for shape in shapes for d in shape.demands)
        over = cluster_budget is not None and mins > cluster_budget
        if over and not self._warned_cluster:
            log.error(
                "supervisor: the mins of %d host(s) add up to %d, more than cluster_budget "
                "%s; every host keeps its mins, so the cluster runs above it",
                len(shapes), mins, cluster_budget,
            )  # fmt: skip
        self._warned_cluster = over

    def _decide(
        self,
        shapes: list[Host],
        plans: Mapping[str, Any],
        backlog: Mapping[str, int],
        hosts: Mapping[str, HostInfo],
        now: float,
    ) -> list[Decision]:
        decisions = []
        for shape in shapes:
            by_name = {d.name: d for d in shape.demands}
            for partition, target in plans[shape.name].targets.items():
                key = (shape.name, partition)
                before = self.planned.get(key, by_name[partition].current)
                self.planned[key] = target
                if target == before:
                    continue
                if partition in hosts[shape.name].degraded:
                    reason = "degraded: its worker crash-loops"
                else:
                    d = replace(by_name[partition], backlog=backlog.get(partition, 0))
                    reason = why(d, shape.budget)
                decisions.append(
                    Decision(time.time(), shape.name, partition, before, target, reason)
                )
                self.changed_at[key] = now
        return decisions

    def _stage(
        self,
        shape: Host,
        targets: Mapping[str, int],
        pools: Mapping[str, Mapping[str, Mapping[str, Any]]],
    ) -> dict[str, int]:
        seen = pools.get(shape.name, {})
        current = {d.name: d.current for d in shape.demands}
        # A pool that did not answer may still run as many tasks as it was last given.
        held = {d.name: _held(seen.get(d.name), d.current) for d in shape.demands}
        staged = stage(targets, current, held, shape.budget)
        for partition, size in staged.items():
            self.staged[(shape.name, partition)] = size
        return staged

    def _current(
        self, host: str, partition: str, pool: Mapping[str, Any] | None, initial: int
    ) -> int:
        # A pool that did not answer (starting, restarting, draining) counts at the size it
        # was last given.
        if pool is not None:
            return int(pool["slots"])
        return self.staged.get((host, partition), initial)


def _pools_by_host(
    observations: list[PartitionObservation],
) -> dict[str, dict[str, Mapping[str, Any]]]:
    found: dict[str, dict[str, Mapping[str, Any]]] = {}
    for o in observations:
        for pool in o.pools:
            host = str(pool["worker"]).split("@", 1)[1]
            found.setdefault(host, {})[o.name] = pool
    return found


def _held(pool: Mapping[str, Any] | None, unknown: int) -> int:
    # Tasks a pool holds: running, or fetched and about to run, at most one per process.
    if pool is None:
        return unknown
    return min(int(pool["size"]), int(pool["busy"]) + int(pool["reserved"]))


def _state(breaker: Mapping[str, Any] | None) -> State | None:
    if breaker is None:
        return None
    try:
        return State(breaker["state"])
    except ValueError:
        return None  # unknown: the store is unreachable, and the gates decide by themselves
