"""The consumer gate: a worker stops fetching from its partition's queues while the breaker
halts it, fetches only probes while it is half-open, and reports every task's outcome.

It is a Celery consumer bootstep, so it applies the wanted queues again whenever the consumer
restarts after a broker reconnect: a cancelled queue stays cancelled. The pool's resize pauses
a worker through it too: at target 0 it consumes no queue, whatever the breaker says. Between
restarts a thread watches the breaker and asks the worker's own consumer, over remote control
(which runs in the consumer's thread), to apply the queues it wants. The same thread, in the
one worker of the partition holding a lease, moves tasks: waiting tasks into the probe queue
while half-open (one per probe permit), and parked tasks back to the partition's queue, at
`replay_rate`, once the breaker has closed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
)
from celery.signals import task_postrun, task_prerun, task_success
from celery.utils.imports import symbol_by_name

from partitioner.app import WORKER_ENV, Partitioner, partitioner_of
from partitioner.breaker.board import Breakers
from partitioner.breaker.machine import Outcome, State
from partitioner.breaker.producer import PROBE_HEADER
from partitioner.breaker.transfer import Transfer
from partitioner.errors import PartitionOpen, StoreUnavailable
from partitioner.supervisor.lease import Lease
from partitioner.topology import Partition

log = logging.getLogger(__name__)

TICK_S = 0.05
# The mover looks at the queues less often than the gate at the breaker: an empty look
# costs a broker round trip per priority list.
MOVE_EVERY_S = 0.25
LEASE_MS = 3000
# Asks a worker's consumer thread to apply the queues its gate wants now.
GATE_COMMAND = "partitioner_gate"
# Failures whatever the record and ignore lists say.
ALWAYS_FAILURES = (TimeLimitExceeded, SoftTimeLimitExceeded, WorkerLostError)
# Ends of a task that say nothing of its dependency: a revoke or a cancel on connection
# loss (Terminated), a replaced or ignored task (Ignore), a rejected message, a shutdown,
# and a task its own partition's breaker held back.
NOT_OUTCOMES = (Terminated, Ignore, Reject, SystemExit, KeyboardInterrupt, PartitionOpen)


class ConsumerGate(bootsteps.StartStopStep):  # type: ignore[misc]
    """What a partition worker consumes: the queues its breaker lets it consume, or
    none while its pool is paused.

    Present in every launched worker, breakers or not: the pool's resize pauses a worker
    at target 0 through it (see `partitioner.supervisor.pool`).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.partitioner: Partitioner = partitioner_of(c.app)
        self.hostname = str(c.hostname)
        self.worker = os.environ.get(WORKER_ENV, self.hostname)
        self.partition = self.partitioner.topology.by_name[self.worker.split("@", 1)[0]]
        # Not `enabled`: a bootstep with enabled = False is never started, and the gate
        # must start in every worker to apply a pause.
        breakers = self.partitioner.breakers
        self.breaker_on = self.partition.breaker.enabled and breakers is not None
        # Set by the pool's resize at target 0; read on every (re)start of the consumer.
        self.paused = False
        self.applied: frozenset[str] | None = None
        self.requested: frozenset[str] | None = None
        self._thread: threading.Thread | None = None
        c.partitioner_gate = self
        register()
        if self.breaker_on:
            assert self.partitioner.breakers is not None
            record_outcomes(c.app, self.partitioner.breakers, self.partition)

    def start(self, c: Any) -> None:
        if self.breaker_on:
            self.requested = self.wanted()
        self.apply(c)
        consuming = ", ".join(sorted(self.applied or ())) or "nothing"
        log.debug("%s: consuming %s", self.partition.name, consuming)
        if self.breaker_on and self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, args=(c.app,), name="partitioner-gate", daemon=True
            )
            self._thread.start()

    @property
    def gated(self) -> frozenset[str]:
        """Every queue the gate decides about."""
        if not self.breaker_on:
            return frozenset(self.partition.queues)
        return frozenset((*self.partition.queues, self.partition.probe_queue))

    def wanted(self) -> frozenset[str]:
        """The queues the breaker lets this worker consume now."""
        p = self.partition
        if not self.breaker_on:
            return self.gated
        assert self.partitioner.view is not None
        seen = self.partitioner.view.get(p.name)
        if seen is None:
            return self.gated if p.breaker.on_store_error == "allow" else frozenset()
        state = seen.now()
        if state is State.HALF_OPEN:
            return frozenset((p.probe_queue,))
        return frozenset() if state.halts else self.gated

    def consumed(self) -> frozenset[str]:
        """The queues this worker should consume now: none while its pool is paused."""
        return frozenset() if self.paused else self.wanted()

    def apply(self, c: Any) -> frozenset[str] | None:
        """Add and cancel queues on consumer `c` to match `consumed()`.

        Runs in the consumer's thread. Returns the queues now consumed if that changed,
        else None.
        """
        if c.task_consumer is None:
            return None  # the consumer restarts; start() applies again
        wanted = self.consumed()
        current = {q.name for q in c.task_consumer.queues}
        for queue in sorted(wanted - current):
            # Named in full: the probe queue is not in task_queues (see app.py).
            c.add_task_queue(queue, exchange=queue, exchange_type="direct", routing_key=queue)
        for queue in sorted((self.gated & current) - wanted):
            c.cancel_task_queue(queue)
        changed = wanted != self.applied
        self.applied = wanted
        return wanted if changed else None

    def pause(self, c: Any, paused: bool) -> None:
        """Stop (or restart) consuming every queue, whatever the breaker says."""
        self.paused = paused
        self.apply(c)

    def _watch(self, app: Any) -> None:
        mover = Mover(self.partitioner, self.partition, self.worker)
        failing = False
        while True:
            try:
                wanted = self.wanted()
                if wanted != self.requested:
                    self._request(app, wanted)
                mover.tick(time.monotonic())
            except Exception:  # the gate must outlive any one failure; it retries next tick
                # Logged once per run of failures: a broker that is away for a minute would
                # otherwise log a traceback every tick.
                if not failing:
                    log.exception(
                        "%s: consumer gate step failed; retrying every %g s",
                        self.partition.name,
                        TICK_S,
                    )
                failing = True
            else:
                if failing:
                    log.info("%s: consumer gate steps succeed again", self.partition.name)
                failing = False
            time.sleep(TICK_S)

    def _request(self, app: Any, wanted: frozenset[str]) -> None:
        # The consumer is not thread-safe: ask its own thread, over remote control, to
        # apply what the breaker wants. It looks again when the command arrives, so that
        # a pause applied in the meantime is not undone by a request sent before it.
        app.control.broadcast(GATE_COMMAND, destination=[self.hostname], reply=False)
        self.requested = wanted


def register() -> None:
    """Register the gate's remote-control command in this worker process."""
    from celery.worker.control import Panel, control_command

    if GATE_COMMAND not in Panel.data:
        control_command(name=GATE_COMMAND)(_on_gate_command)


def _on_gate_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    gate: ConsumerGate | None = getattr(state.consumer, "partitioner_gate", None)
    if gate is None:
        return {"error": "this worker has no consumer gate"}
    changed = gate.apply(state.consumer)
    if changed is not None:
        consuming = ", ".join(sorted(changed)) or "nothing"
        log.info("%s: consumer gate: consuming %s", gate.partition.name, consuming)
    return {"consuming": sorted(gate.applied or ())}


class Mover:
    """Moves a partition's tasks between its queues, in the one worker holding the lease."""

    def __init__(self, partitioner: Partitioner, partition: Partition, worker: str) -> None:
        assert partitioner.breakers is not None and partitioner.view is not None
        self.breakers: Breakers = partitioner.breakers
        self.view = partitioner.view
        self.partition = partition
        self.worker = worker
        self.transfer = Transfer(partitioner)
        lease_key = f"{partitioner.view.channel}:mover:{partition.name}"
        self.lease = Lease(partitioner.view.client, lease_key, worker, LEASE_MS)
        self._replay_budget = 0.0
        self._last = time.monotonic()

    def tick(self, now: float) -> None:
        """Move what the breaker's state asks for; at most every MOVE_EVERY_S."""
        if now - self._last < MOVE_EVERY_S:
            return
        elapsed, self._last = now - self._last, now
        seen = self.view.get(self.partition.name)
        if seen is None or not self._lease():
            return
        state = seen.now()
        if state is State.HALF_OPEN:
            self._feed_probes()
        elif state.halts:
            self._unprobe()
        else:
            self._replay(elapsed)

    def _unprobe(self) -> None:
        # Probes of a period that re-opened the breaker before they ran would run as extra
        # probes of the next period: while open (no probe is admitted), move them back.
        p = self.partition
        moved = True
        while moved:
            moved = self.transfer.move(p.probe_queue, p.queue)

    def _lease(self) -> bool:
        try:
            return self.lease.hold()
        except redis.RedisError as exc:
            # The store went away before the view noticed: no mover, and one warning.
            self.breakers.health.failed(exc)
            return False

    def _feed_probes(self) -> None:
        p = self.partition
        for source in (*p.queues, p.parking_queue):
            while self.transfer.waiting(source) > 0:
                try:
                    period = self.breakers.claim(p)
                except StoreUnavailable:
                    return
                if not period:
                    return
                self.transfer.move(source, p.probe_queue, headers={PROBE_HEADER: period})

    def _replay(self, elapsed_s: float) -> None:
        p = self.partition
        rate = p.breaker.replay_rate
        # A budget of one task at least, so that a rate below 1/s still replays.
        self._replay_budget = min(max(rate, 1.0), self._replay_budget + rate * elapsed_s)
        while self._replay_budget >= 1 and self.transfer.move(p.parking_queue, p.queue):
            self._replay_budget -= 1


def record_outcomes(app: Any, breakers: Breakers, partition: Partition) -> None:
    """Report the outcome of every task this worker runs to the partition's breaker.

    Failures are reported by the worker's main process, through a Request class wrapped
    around each task's own: it alone sees every failure, a lost pool process and a hard time
    limit included. Successes are reported by the pool process that ran the task, because
    Celery's fast success path in the main process calls no overridable hook.
    """
    reporter = Reporter(breakers, partition)
    for task in app.tasks.values():
        if not task.name.startswith("celery."):
            task.Request = _reporting(task.Request, reporter)

    started: dict[str, float] = {}

    def on_prerun(task_id: str, **kwargs: Any) -> None:
        started[task_id] = time.monotonic()

    def on_success(sender: Any, **kwargs: Any) -> None:
        request = sender.request
        began = started.get(request.id)
        runtime = time.monotonic() - began if began is not None else 0.0
        if not sender.name.startswith("celery."):
            reporter.report(None, runtime, getattr(request, PROBE_HEADER, 0))

    def on_postrun(task_id: str, **kwargs: Any) -> None:
        started.pop(task_id, None)  # after every end, not only a success

    task_prerun.connect(on_prerun, weak=False)
    task_success.connect(on_success, weak=False)
    task_postrun.connect(on_postrun, weak=False)


def _reporting(base: Any, reporter: Reporter) -> type:
    request_class = symbol_by_name(base)

    class ReportingRequest(request_class):  # type: ignore[misc, valid-type]
        def on_failure(self, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
            started = self.time_start
            runtime = time.time() - started if started else 0.0
            probe = self._request_dict.get(PROBE_HEADER, 0)
            reporter.report(_exception(exc_info), runtime, probe)
            return super().on_failure(exc_info, *args, **kwargs)

    return ReportingRequest


class Reporter:
    """Turns a task's end into an `Outcome`, by the partition's record and ignore lists."""

    def __init__(self, breakers: Breakers, partition: Partition) -> None:
        self.breakers = breakers
        self.partition = partition
        self.slow_s = partition.breaker.slow_call_s

    def report(self, exc: BaseException | None, runtime_s: float, probe: object) -> None:
        failed = self.failed(exc)
        if failed is None:
            return
        slow = self.slow_s is not None and runtime_s >= self.slow_s
        # The header carries the half-open period that admitted the probe; 0 for none.
        period = probe if isinstance(probe, int) and not isinstance(probe, bool) else 0
        self.breakers.record(self.partition, Outcome(failed, slow, period))

    def failed(self, exc: BaseException | None) -> bool | None:
        """True, False, or None for an end that says nothing of the dependency."""
        if exc is None:
            return False
        if isinstance(exc, Retry):
            if not isinstance(exc.exc, BaseException):
                return None  # self.retry() with no exception: a plan, not a failure
            exc = exc.exc
        if isinstance(exc, NOT_OUTCOMES):
            return None
        if isinstance(exc, ALWAYS_FAILURES):
            return True
        names = _dotted_names(type(exc))
        if names & set(self.partition.breaker.ignore):
            return None
        record = set(self.partition.breaker.record)
        return not record or bool(names & record)


def _exception(exc_info: Any) -> BaseException:
    exc: BaseException = exc_info.exception
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    return exc


def _dotted_names(kind: type) -> set[str]:
    # An exception matches a listed name if it is that class or a subclass of it.
    return {f"{k.__module__}.{k.__qualname__}" for k in kind.__mro__}
