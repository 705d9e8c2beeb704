"""The breaker store on Redis: each operation is one Lua script, atomic on the server.

Keys are namespaced per application and partition (`partitioner:<app>:breaker:<name>`) and
expire when unused; states set by hand never expire. Every transition is published on
`partitioner:<app>:breaker:db<N>`, so that every process learns of it at once.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

import redis

from partitioner.breaker.machine import Counts, Outcome, Policy, State, Transition
from partitioner.breaker.store import Snapshot
from partitioner.errors import StoreUnavailable

OPS = ("record", "claim", "set", "snapshot")


@cache
def _source(op: str) -> str:
    lua = files("partitioner.breaker.stores") / "lua"
    return (lua / "prelude.lua").read_text() + "\n" + (lua / f"{op}.lua").read_text()


class RedisStore:
    """Breakers shared by every process that talks to the same Redis database."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        # Pub/sub ignores the database number: the channel names it, so that breakers of
        # the same name in two databases of one server stay apart.
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self.channel = f"partitioner:{namespace}:breaker:db{db}"
        self._scripts = {op: client.register_script(_source(op)) for op in OPS}

    def keys(self, partition: str) -> list[str]:
        """The state hash and the two windows of `partition`'s breaker."""
        base = f"partitioner:{self.namespace}:breaker:{partition}"
        return [base, f"{base}:count", f"{base}:time"]

    def record(self, partition: str, policy: Policy, outcome: Outcome) -> Snapshot:
        flags = [int(outcome.failed), int(outcome.slow), outcome.probe]
        return _snapshot(self._run("record", partition, policy, *flags))

    def claim(self, partition: str, policy: Policy) -> tuple[Snapshot, bool]:
        reply = self._run("claim", partition, policy)
        return _snapshot(reply[:-1]), bool(reply[-1])

    def set(self, partition: str, state: State, reason: str, keep_window: bool = False) -> Snapshot:
        args = (state.value, reason, int(keep_window))
        return _snapshot(self._run("set", partition, Policy(), *args))

    def snapshot(self, partition: str, policy: Policy) -> Snapshot:
        return _snapshot(self._run("snapshot", partition, policy))

    def _run(self, op: str, partition: str, policy: Policy, *args: Any) -> list[Any]:
        argv = [_policy_json(policy), self.channel, partition, _ttl_ms(policy), *args]
        try:
            return list(self._scripts[op](keys=self.keys(partition), args=argv))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"breaker store unreachable: {exc}") from exc


def _policy_json(policy: Policy) -> str:
    fields = dict(policy.__dict__)
    # Lua's cjson turns null into a sentinel that compares unequal to everything.
    fields["slow_call_ms"] = -1 if policy.slow_call_ms is None else policy.slow_call_ms
    return json.dumps(fields)


def _ttl_ms(policy: Policy) -> int:
    # Long enough to outlive the longest open period and window; refreshed by every write.
    return 2 * max(policy.open_max_ms, policy.window_ms) + 60_000


def _snapshot(reply: list[Any]) -> Snapshot:
    state, until_ms, now_ms, calls, failures, slow, reopens, permits, probe_ok, period, events = (
        reply
    )
    transitions = [
        Transition(State(e["old"]), State(e["new"]), e["reason"], int(e["until_ms"]))
        for e in json.loads(events)
        if isinstance(e, dict)
    ]
    return Snapshot(
        state=State(_text(state)),
        until_ms=int(until_ms),
        now_ms=int(now_ms),
        counts=Counts(int(calls), int(failures), int(slow)),
        reopens=int(reopens),
        permits=int(permits),
        probe_ok=int(probe_ok),
        period=int(period),
        transitions=tuple(transitions),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
