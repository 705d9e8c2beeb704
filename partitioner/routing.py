"""Routing through Celery's router extension point: task name → partition → queue."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kombu import Exchange, Queue

from partitioner.breaker.producer import PROBE_HEADER, ProducerGate
from partitioner.errors import RoutingError
from partitioner.topology import Topology

# Celery's own tasks (chord_unlock, backend_cleanup, ...) go where Celery sends them unless a
# partition claims them by an explicit pattern.
CELERY_BUILTIN_PREFIX = "celery."


def declare_queues(topology: Topology) -> dict[str, Queue]:
    """One durable kombu queue per partition queue, on a direct exchange of the same name."""
    return {
        name: Queue(name, Exchange(name, type="direct"), routing_key=name)
        for name in topology.queues
    }


class Router:
    """A Celery router that sends each task to its partition's queue.

    A task that matches no partition raises `RoutingError` out of `apply_async`, so that a
    task is never published to a queue no worker consumes. With a producer gate, the
    partition's breaker may turn the task into a probe, park it, or reject it.
    """

    def __init__(
        self,
        topology: Topology,
        queues: Mapping[str, Queue],
        in_worker_task: Callable[[], bool] = lambda: False,
    ) -> None:
        self.topology = topology
        self.queues = queues
        self.in_worker_task = in_worker_task
        # Called before routing while the broker is not known yet; it may raise.
        self.before_route: Callable[[], object] | None = None
        self.gate: ProducerGate | None = None

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: dict[str, Any],
        task: Any = None,
        **kw: Any,
    ) -> dict[str, Any] | None:
        if self.before_route is not None:
            self.before_route()
        try:
            route = self.topology.route(name)
        except RoutingError:
            if name.startswith(CELERY_BUILTIN_PREFIX):
                return None
            raise
        if self.gate is None:
            return {"queue": self.queues[route.queue]}

        # A task published by a running task (a retry, a chain's next step) is parked
        # rather than rejected: raising there would lose it or fail the task that sent it.
        admission = self.gate.admit(route.partition, park=self.in_worker_task)
        if admission.queue == route.queue:
            return {"queue": self.queues[route.queue]}

        # Celery lets the caller's options win over the route, and a retry carries its old
        # exchange and routing key: a probe or a parked task must not slip back that way.
        # `options` is the very dict Celery merges the route into, so this sticks.
        for key in ("queue", "exchange", "routing_key"):
            options.pop(key, None)
        if admission.probe:
            options["headers"] = {**(options.get("headers") or {}), PROBE_HEADER: admission.probe}
        return {"queue": self.queues[admission.queue]}
