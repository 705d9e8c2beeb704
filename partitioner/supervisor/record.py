"""What the supervisors of all hosts share: who is alive, the plan, and the decisions.

In Redis (the breakers' store) every host's launcher writes a heartbeat that expires with the
leader's lease; the leading supervisor reads them, plans, and writes one plan that every host
applies to its own workers, with each change in a capped decision log that `status` shows.
With no Redis (a RabbitMQ broker and no `state_url`) one host supervises itself alone, and
keeps the same figures in `<state_dir>/supervisor.json` for `status`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis

from partitioner.supervisor.lease import Lease

DECISIONS_KEPT = 50
STATUS_FILE = "supervisor.json"


@dataclass(frozen=True)
class HostInfo:
    """One host's launcher, as its heartbeat tells it."""

    name: str
    budget: int
    workers: dict[str, str] = field(default_factory=dict)  # partition -> running worker
    degraded: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostInfo:
        return cls(data["name"], data["budget"], data["workers"], data["degraded"])


@dataclass(frozen=True)
class Decision:
    """One change of a partition's planned size on one host, with its reason in figures."""

    at: float  # epoch seconds
    host: str
    partition: str
    before: int
    after: int
    reason: str

    def __str__(self) -> str:
        return f"{self.partition}@{self.host} {self.before} -> {self.after}: {self.reason}"


HostPlans = dict[str, dict[str, int]]  # host -> partition -> size


class Record(Protocol):
    """Where the supervisor keeps what every host and `status` read."""

    def heartbeat(self, info: HostInfo, ttl_ms: int) -> None: ...

    def hosts(self) -> list[HostInfo]: ...

    def set_plan(self, plan: HostPlans, lease: Lease | None) -> bool: ...

    def plan(self) -> HostPlans: ...

    def add_decisions(self, decisions: Sequence[Decision]) -> None: ...

    def decisions(self, count: int) -> list[Decision]: ...

    def lease(self, holder: str, ttl_ms: int) -> Lease | None: ...

    def leader(self) -> str | None: ...

    def forget(self, host: str) -> None: ...


class RedisRecord:
    """The shared record in Redis, under `partitioner:<name>:supervisor:`."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.prefix = f"partitioner:{name}:supervisor"

    def heartbeat(self, info: HostInfo, ttl_ms: int) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(f"{self.prefix}:host:{info.name}", json.dumps(asdict(info)), px=ttl_ms)
            pipe.sadd(f"{self.prefix}:hosts", info.name)
            pipe.execute()

    def hosts(self) -> list[HostInfo]:
        members = self.client.smembers(f"{self.prefix}:hosts")
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in members)
        if not names:
            return []
        found = self.client.mget([f"{self.prefix}:host:{n}" for n in names])
        gone = [n for n, raw in zip(names, found, strict=True) if raw is None]
        if gone:
            self.client.srem(f"{self.prefix}:hosts", *gone)
        return [HostInfo.from_dict(json.loads(raw)) for raw in found if raw is not None]

    def set_plan(self, plan: HostPlans, lease: Lease | None) -> bool:
        """Publish `plan`, only while `lease` is still held; False if it was not."""
        key, value = f"{self.prefix}:plan", json.dumps(plan)
        if lease is None:
            self.client.set(key, value)
            return True
        return lease.write_if_held(key, value)

    def plan(self) -> HostPlans:
        raw = self.client.get(f"{self.prefix}:plan")
        return json.loads(raw) if raw else {}

    def add_decisions(self, decisions: Sequence[Decision]) -> None:
        if not decisions:
            return
        key = f"{self.prefix}:decisions"
        with self.client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, *(json.dumps(asdict(d)) for d in decisions))
            pipe.ltrim(key, 0, DECISIONS_KEPT - 1)
            pipe.execute()

    def decisions(self, count: int) -> list[Decision]:
        found = self.client.lrange(f"{self.prefix}:decisions", 0, count - 1)
        return [Decision(**json.loads(raw)) for raw in found]

    def lease(self, holder: str, ttl_ms: int) -> Lease:
        return Lease(self.client, f"{self.prefix}:leader", holder, ttl_ms)

    def leader(self) -> str | None:
        found = self.client.get(f"{self.prefix}:leader")
        return found.decode() if isinstance(found, bytes) else None

    def forget(self, host: str) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(f"{self.prefix}:host:{host}")
            pipe.srem(f"{self.prefix}:hosts", host)
            pipe.execute()


class LocalRecord:
    """One host alone: the record in memory, written to a file for `status` on each change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATUS_FILE
        self._host: HostInfo | None = None
        self._plan: HostPlans = {}
        self._decisions: list[Decision] = []

    def heartbeat(self, info: HostInfo, ttl_ms: int) -> None:
        if info != self._host:
            self._host = info
            self._save()

    def hosts(self) -> list[HostInfo]:
        return [self._host] if self._host is not None else []

    def set_plan(self, plan: HostPlans, lease: Lease | None) -> bool:
        if plan != self._plan:
            self._plan = plan
            self._save()
        return True

    def plan(self) -> HostPlans:
        return self._plan

    def add_decisions(self, decisions: Sequence[Decision]) -> None:
        if decisions:
            self._decisions = [*reversed(decisions), *self._decisions][:DECISIONS_KEPT]
            self._save()

    def decisions(self, count: int) -> list[Decision]:
        return self._decisions[:count]

    def lease(self, holder: str, ttl_ms: int) -> None:
        return None  # alone, this host always leads

    def leader(self) -> str | None:
        return self._host.name if self._host is not None else None

    def forget(self, host: str) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        data = {
            "saved_at": time.time(),
            "leader": self.leader(),
            "hosts": [asdict(h) for h in self.hosts()],
            "plan": self._plan,
            "decisions": [asdict(d) for d in self._decisions],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, self.path)

    @classmethod
    def read(cls, state_dir: Path) -> LocalRecord | None:
        """The record a launcher in `state_dir` last saved, if any."""
        path = state_dir / STATUS_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        found = cls(state_dir)
        hosts = [HostInfo.from_dict(h) for h in data.get("hosts", [])]
        found._host = hosts[0] if hosts else None
        found._plan = data.get("plan", {})
        found._decisions = [Decision(**d) for d in data.get("decisions", [])]
        return found
