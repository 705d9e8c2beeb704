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
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from partitioner.app import Partitioner
from partitioner.breaker.machine import State
from partitioner.errors import BrokerError
from partitioner.observe import PartitionObservation, observe
from partitioner.supervisor.plan import Demand, Host, plan_cluster, stage, why
from partitioner.supervisor.record import Decision, HostInfo, LocalRecord, Record, RedisRecord

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
        self.planned: dict[tuple[str, str], int] = {}
        self.changed_at: dict[tuple[str, str], float] = {}
        self._store_failing = False

    @property
    def _lease_ms(self) -> int:
        return round(self.partitioner.settings.supervisor.lease_s * 1000)

    def step(self, pools: Pools, now: float | None = None) -> dict[str, int] | None:
        """One control step; the sizes this host's pools should have, if known yet."""
        now = time.monotonic() if now is None else now
        budget = self.partitioner.topology.budget
        try:
            self.record.heartbeat(
                HostInfo(self.host, budget, pools.workers, pools.degraded), self._lease_ms
            )
            if self._lead():
                self._plan(now)
            mine = self.record.plan().get(self.host)
        except (redis.RedisError, BrokerError) as exc:
            if not self._store_failing:
                log.warning(
                    "supervisor: cannot reach the broker or the state store (%s); pools keep "
                    "their sizes until it answers",
                    exc,
                )
            self._store_failing = True
            return None
        if self._store_failing:
            log.info("supervisor: the state store answers again")
            self._store_failing = False
        return mine

    def close(self) -> None:
        """Give up the lead and this host's heartbeat at once, so another host takes over."""
        try:
            if self.lease is not None and self.leading:
                self.lease.release()
            self.record.forget(self.host)
        except redis.RedisError as exc:
            log.warning("supervisor: could not give up the lead cleanly: %s", exc)

    def _lead(self) -> bool:
        leading = self.lease is None or self.lease.hold()
        if leading != self.leading:
            if leading:
                log.info("supervisor: %s leads; it plans for every host", self.host)
            else:
                log.info("supervisor: %s follows %s", self.host, self.record.leader())
        self.leading = leading
        return leading

    def _plan(self, now: float) -> None:
        settings = self.partitioner.settings
        topology = self.partitioner.topology
        hosts = {h.name: h for h in self.record.hosts()}
        expected = sum(len(h.workers) for h in hosts.values())
        timeout_s = min(1.0, settings.supervisor.interval_s)
        observations = observe(self.partitioner, timeout_s=timeout_s, expected=expected)
        pools = _pools_by_host(observations)
        states = {o.name: _state(o.breaker) for o in observations}
        halted = {name for name, state in states.items() if state in HALTING}

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
                    halted=p.name in halted or p.name in info.degraded,
                    probing=states.get(p.name) is State.HALF_OPEN,
                )
                for p in topology.partitions
            ]
            shapes.append(Host(name, info.budget, demands))
        backlog = {o.name: o.backlog for o in observations}
        since = {key: now - at for key, at in self.changed_at.items()}
        plans = plan_cluster(
            shapes, backlog, settings.cluster_budget, since, settings.supervisor.cooldown_s
        )

        decisions = []
        staged: dict[str, dict[str, int]] = {}
        for shape in shapes:
            targets = plans[shape.name].targets
            by_name = {d.name: d for d in shape.demands}
            for partition, target in targets.items():
                key = (shape.name, partition)
                before = self.planned.get(key, by_name[partition].current)
                if target != before:
                    d = replace(by_name[partition], backlog=backlog.get(partition, 0))
                    reason = (
                        "degraded: its worker crash-loops"
                        if partition in hosts[shape.name].degraded
                        else why(d, shape.budget)
                    )
                    decisions.append(
                        Decision(time.time(), shape.name, partition, before, target, reason)
                    )
                    self.changed_at[key] = now
                self.planned[key] = target
            seen = pools.get(shape.name, {})
            current = {d.name: d.current for d in shape.demands}
            held = {p: _held(seen.get(p)) for p in targets}
            staged[shape.name] = stage(targets, current, held, shape.budget)
        for decision in decisions:
            log.info("supervisor: %s", decision)
        self.record.add_decisions(decisions)
        self.record.set_plan(staged)

    def _current(
        self, host: str, partition: str, pool: Mapping[str, Any] | None, initial: int
    ) -> int:
        # A pool that did not answer (starting, restarting) counts at what it was asked for.
        if pool is not None:
            return int(pool["slots"])
        return self.planned.get((host, partition), initial)


def _pools_by_host(
    observations: list[PartitionObservation],
) -> dict[str, dict[str, Mapping[str, Any]]]:
    found: dict[str, dict[str, Mapping[str, Any]]] = {}
    for o in observations:
        for pool in o.pools:
            host = str(pool["worker"]).split("@", 1)[1]
            found.setdefault(host, {})[o.name] = pool
    return found


def _held(pool: Mapping[str, Any] | None) -> int:
    # Tasks a pool holds: running, or fetched and about to run.
    if pool is None:
        return 0
    return int(pool.get("busy", 0)) + int(pool.get("reserved", 0))


def _state(breaker: Mapping[str, Any] | None) -> State | None:
    if breaker is None:
        return None
    try:
        return State(breaker["state"])
    except ValueError:
        return None  # unknown: the store is unreachable, and the gates decide by themselves
