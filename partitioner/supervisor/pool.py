"""A partition worker's pool, resized in place at the supervisor's command.

The supervisor sends its workers one remote-control broadcast, `partitioner_resize`,
with a target concurrency per worker name; each worker applies its own entry and replies
with its figures. Control commands run in the consumer's thread, so the consumer and the
pool are touched from the one thread that owns them.

- Grow (prefork): the processes start at once, and the broker prefetch rises with them.
- Shrink (prefork): the prefetch falls at once, so the worker fetches nothing beyond the
  target; surplus processes are released only while idle, checked every `CHECK_S`.
- Target 0: the worker consumes no queue (a prefetch of 0 would mean *unlimited*) and
  keeps one idle standby process. Its consumer gate keeps the queues cancelled across
  reconnects.
- Threads and solo pools cannot resize in place: they pause and resume, and reply
  `resizable: False` so that the launcher restarts them at a new size.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any, TypedDict

from celery import bootsteps
from celery.utils.imports import symbol_by_name

from partitioner.app import WORKER_ENV
from partitioner.errors import PartitionerError

log = logging.getLogger(__name__)

COMMAND = "partitioner_resize"
# Set by `partitioner launch`: the concurrency a worker starts at (unset: --concurrency).
TARGET_ENV = "PARTITIONER_TARGET"
# How often a pending shrink looks for idle processes to release.
CHECK_S = 0.05
# How many of the latest tasks the mean run time covers.
RUNTIME_TASKS = 20
# The consumer attribute that holds this worker's `PoolControl`.
ATTR = "partitioner_pool"


class PoolFigures(TypedDict):
    """A worker's reply to the resize command, and its entry in `status --json`."""

    worker: str
    partition: str
    target: int
    slots: int
    size: int
    busy: int
    reserved: int
    draining: bool
    resizable: bool


def releasable(excess: int, idle: int, unaccepted: int, settled: bool) -> int:
    """How many processes a shrink may release now, with `excess` more than it wants.

    A task written to a process but not yet accepted by it has no process id in
    billiard's books, so that process looks idle and would be terminated with the task:
    release nothing while any task is `unaccepted`, or while a process starts or ends
    (not `settled`).
    """
    if excess <= 0 or unaccepted or not settled:
        return 0
    return min(excess, idle)


def send_targets(
    app: Any,
    targets: Mapping[str, int],
    timeout_s: float = 1.0,
    workers: Sequence[str] | None = None,
) -> list[PoolFigures]:
    """Broadcast `targets` (worker name: concurrency); every worker replies its figures.

    With `workers`, only they are asked, and the wait ends once all of them replied.
    """
    replies = app.control.broadcast(
        COMMAND,
        arguments={"targets": dict(targets)},
        destination=list(workers) if workers is not None else None,
        limit=len(workers) if workers else None,
        reply=True,
        timeout=timeout_s,
    )
    found: list[PoolFigures] = []
    for reply in replies or []:
        for answer in reply.values():
            if isinstance(answer, dict) and "slots" in answer:
                found.append(answer)  # type: ignore[arg-type]
    return found


def register() -> None:
    """Register the resize command in this worker process (called by `attach`)."""
    from celery.worker.control import Panel, control_command

    if COMMAND not in Panel.data:
        # JSON on the command line:
        # `celery -A APP control partitioner_resize '{"order@host": 2}'`
        args = [("targets", json.loads)]
        control_command(name=COMMAND, args=args, signature="<targets-json>")(_resize)


def _resize(state: Any, targets: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    control: PoolControl | None = getattr(state.consumer, ATTR, None)
    if control is None:
        return {"error": "this worker was not started by partitioner launch"}
    target = (targets or {}).get(control.worker)
    if target is None:
        return control.figures()
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        problem = f"target {target!r} for {control.worker} is not a whole number >= 0"
        return {"error": problem}
    return control.resize(target)


class RunTimes:
    """The run times of a worker's latest tasks, measured in its main process."""

    def __init__(self, size: int = RUNTIME_TASKS) -> None:
        self._latest: deque[float] = deque(maxlen=size)

    def add(self, runtime_s: float) -> None:
        self._latest.append(runtime_s)

    @property
    def mean_s(self) -> float | None:
        """The mean run time in seconds, or None before the first task ends."""
        if not self._latest:
            return None
        return sum(self._latest) / len(self._latest)


class PoolControl:
    """One worker's pool: its target concurrency and the steps that reach it."""

    def __init__(self, c: Any, gate: Any, worker: str, target: int | None) -> None:
        self.consumer = c
        self.gate = gate
        self.worker = worker
        self.partition = worker.split("@", 1)[0]
        self.kind = _kind(c.pool)
        self.target = self._fixed_size() if target is None else target
        self.runtimes = RunTimes()
        self._check: Any = None
        gate.paused = self.target == 0

    @property
    def resizable(self) -> bool:
        # Celery refuses pool_grow/pool_shrink under --autoscale, and so do we.
        autoscaler = getattr(self.consumer.controller, "autoscaler", None)
        return self.kind == "prefork" and not autoscaler

    @property
    def slots(self) -> int:
        """How many tasks the worker may hold and run now; 0 while paused."""
        if self.target == 0:
            return 0
        return self.target if self.resizable else self._fixed_size()

    @property
    def size(self) -> int:
        """Live pool processes (threads: the thread limit)."""
        if self.kind == "prefork":
            return len(self._billiard._pool)
        return self._fixed_size()

    @property
    def draining(self) -> bool:
        """True while surplus processes wait for their tasks to end."""
        if not self.resizable:
            return False
        pool = self._billiard
        return bool(max(pool._processes, len(pool._pool)) > self._wanted_size)

    def figures(self) -> PoolFigures:
        """The worker's pool as the resize command replies it."""
        from celery.worker import state as worker_state

        return PoolFigures(
            worker=self.worker,
            partition=self.partition,
            target=self.target,
            slots=self.slots,
            size=self.size,
            busy=len(worker_state.active_requests),
            reserved=self._unaccepted(),
            draining=self.draining,
            resizable=self.resizable,
        )

    def resize(self, target: int) -> PoolFigures:
        """Move towards `target` now; a shrink ends later, as tasks end.

        Runs in the consumer's thread.
        """
        before = (self.slots, self.size)
        self.target = target
        # Fetching follows the target first: a shrink stops fetching before it waits for
        # idle processes, and a grow fetches for the standby process while the new ones fork.
        self._retune_prefetch(before[0], self.slots)
        if self.gate.paused != (self.slots == 0):
            self.gate.pause(self.consumer, self.slots == 0)
        if self.resizable:
            self._reach_size()
        figures = self.figures()
        if (figures["slots"], figures["size"]) != before or figures["draining"]:
            log.info(
                "%s: pool resized: target %d, slots %d -> %d, processes %d%s",
                self.partition, target, before[0], figures["slots"], figures["size"],
                " (draining)" if figures["draining"] else "",
            )  # fmt: skip
        return figures

    def start(self) -> None:
        """On every start of the consumer: set the prefetch, resume a pending shrink."""
        c = self.consumer
        if self.resizable:
            self._reach_size()
        if c.qos is None or not c.initial_prefetch_count:
            return  # prefetch disabled: nothing to keep in step
        prefetch = max(self.slots, 1) * c.prefetch_multiplier
        c.initial_prefetch_count = prefetch
        # After a reconnect Celery raises the prefetch, a task at a time, back up to the
        # pool's process count, which counts processes still draining. The target sets
        # the prefetch instead.
        c._maximum_prefetch_restored = True
        with c.qos._mutex:
            c.qos.value = prefetch
        c.qos.update()

    def stop(self) -> None:
        """Cancel the pending shrink's timer; `start` sets it again."""
        if self._check is not None:
            self._check.cancel()
            self._check = None

    @property
    def _billiard(self) -> Any:
        return self.consumer.pool._pool

    @property
    def _wanted_size(self) -> int:
        # At target 0 one process stays, idle, so that a resume needs no fork.
        return max(self.target, 1)

    def _fixed_size(self) -> int:
        if self.kind == "solo":
            return 1
        if self.kind == "prefork" and self.consumer.pool._pool is not None:
            return int(self._billiard._processes)
        return int(self.consumer.pool.limit)

    def _reach_size(self) -> None:
        pool = self._billiard
        more = self._wanted_size - pool._processes
        if more > 0:
            pool.grow(more)
            # AsynPool starts new processes by itself only every 5 s: start them now.
            # It runs a full garbage collection before each fork, some 80 ms in a
            # worker. Frozen, the objects that exist now are not scanned, and unfrozen
            # after the forks they are collected as usual. The children keep them
            # frozen, so garbage they inherit is never finalised there, which is what
            # that collection guards against.
            gc.freeze()
            try:
                pool.maintain_pool()
            finally:
                gc.unfreeze()
        elif more < 0:
            self._shrink()

    def _shrink(self) -> None:
        self.stop()
        pool = self._billiard
        excess = pool._processes - self._wanted_size
        idle, settled = self._idle(pool), self._settled(pool)
        n = releasable(excess, idle, self._unaccepted(), settled)
        if n:
            # "Can't shrink pool" if a process became busy after all: the next check
            # retries.
            with suppress(ValueError):
                pool.shrink(n)
            _fence(pool)
            log.debug("%s: released %d idle process(es)", self.partition, n)
        if pool._processes > self._wanted_size and self.consumer.hub is not None:
            self._check = self.consumer.hub.call_later(CHECK_S, self._on_check)

    def _on_check(self) -> None:
        self._check = None
        try:
            self._shrink()
        except Exception:  # a timer callback must not take the event loop down
            log.exception("%s: pool shrink failed; retrying in %g s", self.partition, CHECK_S)
            self._check = self.consumer.hub.call_later(CHECK_S, self._on_check)

    @staticmethod
    def _idle(pool: Any) -> int:
        return sum(1 for process in pool._pool if not pool._worker_active(process))

    @staticmethod
    def _unaccepted() -> int:
        from celery.worker import state as worker_state

        active = set(worker_state.active_requests)
        return len(set(worker_state.reserved_requests) - active)

    @staticmethod
    def _settled(pool: Any) -> bool:
        starting = getattr(pool, "_waiting_to_start", ())
        return len(pool._pool) == pool._processes and not starting

    def _retune_prefetch(self, before: int, after: int) -> None:
        c = self.consumer
        if c.qos is None or not c.initial_prefetch_count:
            return
        # Paused, the worker consumes nothing: the prefetch of one slot stays, because 0
        # would mean "unlimited" to the broker.
        delta = (max(after, 1) - max(before, 1)) * c.prefetch_multiplier
        if not delta:
            return
        c.initial_prefetch_count = max(after, 1) * c.prefetch_multiplier
        # By the difference, not to a value: Celery adds one for each task with an ETA
        # that the worker holds, and takes it back when the task is due.
        with c.qos._mutex:
            if c.qos.value:
                c.qos.value = max(1, c.qos.value + delta)
        c.qos.update()


def _fence(pool: Any) -> None:
    # billiard sends SIGTERM to a released process and forgets it only once it has
    # exited; meanwhile AsynPool could still write a newly fetched task to it. Withdraw
    # its input from the ones AsynPool writes to.
    inqueues = getattr(pool, "_all_inqueues", None)
    if inqueues is None:
        return
    for process in pool._pool:
        if getattr(process, "_controlled_termination", False):
            inqueues.discard(process.inqW_fd)


def _kind(pool: Any) -> str:
    from celery.concurrency import prefork, solo, thread

    if isinstance(pool, prefork.TaskPool):
        return "prefork"
    if isinstance(pool, thread.TaskPool):
        return "threads"
    if isinstance(pool, solo.TaskPool):
        return "solo"
    return type(pool).__module__.rsplit(".", 1)[-1]


def initial_target() -> int | None:
    """The target concurrency `partitioner launch` gave this worker, if any."""
    raw = os.environ.get(TARGET_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        target = int(raw)
    except ValueError:
        target = -1
    if target < 0:
        raise PartitionerError(
            f"{TARGET_ENV}={raw!r} is not a whole number >= 0; partitioner launch "
            "sets it, unset it to start at --concurrency"
        )
    return target


class PoolStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The worker side of resizing: keeps the pool's target across consumer restarts."""

    requires = ("partitioner.breaker.consumer:ConsumerGate",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        worker = os.environ.get(WORKER_ENV, str(c.hostname))
        self.control = PoolControl(c, c.partitioner_gate, worker, initial_target())
        setattr(c, ATTR, self.control)
        measure_runtimes(c.app, self.control.runtimes)

    def start(self, c: Any) -> None:
        self.control.start()

    def stop(self, c: Any) -> None:
        self.control.stop()

    def shutdown(self, c: Any) -> None:
        self.control.stop()


def measure_runtimes(app: Any, runtimes: RunTimes) -> None:
    """Record the run time of every task that ends in this worker, in its main process.

    NOTE: Celery's fast success path in the main process calls no overridable hook but
    the acknowledgement, so only tasks acknowledged late (Partitioner's default) are
    measured; a task with `acks_late=False` is acknowledged before it runs.
    """
    for task in app.tasks.values():
        if not task.name.startswith("celery."):
            task.Request = _timing(task.Request, runtimes)


def _timing(base: Any, runtimes: RunTimes) -> type:
    request_class = symbol_by_name(base)

    class TimingRequest(request_class):  # type: ignore[misc, valid-type]
        _accepted_at: float | None = None

        def on_accepted(self, pid: int, time_accepted: float) -> Any:
            # The pool process's monotonic clock is the system's, as is ours.
            self._accepted_at = time_accepted
            return super().on_accepted(pid, time_accepted)

        def acknowledge(self) -> Any:
            began = self._accepted_at
            if not self.acknowledged and began is not None and self.task.acks_late:
                runtimes.add(time.monotonic() - began)
            return super().acknowledge()

    return TimingRequest
