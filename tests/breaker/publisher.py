"""A producer process for the breaker tests: publishes tasks through an attached app.

Settings come from `PARTITIONER_*` variables, as in any producer. Once attached, with its
broker connection and breaker view ready, it prints `ready` and reads from its input the
epoch time at which to start, so that many processes publish at once. It then publishes
`--count` tasks `--interval-s` apart and prints one JSON object: the queue each published
task went to (the routing key the router chose) and the `retry_after_s` of each rejection.

    python -m tests.breaker.publisher --count 40 --interval-s 0.01
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from partitioner import attach
from partitioner.errors import PartitionOpen

TASK = "shop.payment.charge"
ROOT = Path(__file__).resolve().parents[2]
READY = "ready"


def start(
    env: Mapping[str, str], count: int, interval_s: float, work_s: float | None = None
) -> subprocess.Popen[str]:
    """Start one producer process; it publishes once `release` gives it the start time."""
    command = [
        sys.executable, "-m", "tests.breaker.publisher",
        "--count", str(count), "--interval-s", str(interval_s),
    ]  # fmt: skip
    if work_s is not None:
        command += ["--work-s", str(work_s)]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_ready(processes: Sequence[subprocess.Popen[str]]) -> None:
    """Wait until every producer is attached and ready to publish."""
    for process in processes:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line == READY, f"publisher said {line!r} (exit code {process.poll()})"


def release(processes: Sequence[subprocess.Popen[str]], start_at: float) -> None:
    """Tell every ready producer to start publishing at the epoch time `start_at`."""
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{start_at}\n")
        process.stdin.flush()


def report(process: subprocess.Popen[str], timeout_s: float = 30.0) -> dict[str, Any]:
    """What a producer process printed once it published everything."""
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, f"publisher exited with {process.returncode}"
    found: dict[str, Any] = json.loads(out)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval-s", type=float, default=0.0)
    parser.add_argument("--work-s", type=float, default=None, help="each task's run time")
    args = parser.parse_args()

    app = Celery("breaker-publisher", set_as_current=False)
    partitioner = attach(app)
    partition = partitioner.topology.route(args.task).partition
    queues: dict[str, str] = {}

    def remember(headers: dict[str, Any], routing_key: str, **kwargs: Any) -> None:
        queues[str(headers["id"])] = routing_key

    before_task_publish.connect(remember, weak=False)

    # The broker connection and the breaker view (its first read, its thread) are made
    # ready before the start, so that the processes race from their first publish.
    assert partitioner.view is not None
    partitioner.view.get(partition.name)
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
    print(READY, flush=True)
    start_at = float(sys.stdin.readline())
    time.sleep(max(0.0, start_at - time.time()))

    started = time.time()
    retry_after_s: list[float] = []
    kwargs: dict[str, Any] = {} if args.work_s is None else {"work_s": args.work_s}
    for _ in range(args.count):
        try:
            app.send_task(args.task, kwargs={**kwargs, "sent_at": time.time()})
        except PartitionOpen as exc:
            retry_after_s.append(exc.retry_after_s)
        time.sleep(args.interval_s)

    finished = time.time()
    result = {"started": started, "finished": finished, "queues": queues}
    print(json.dumps(result | {"retry_after_s": retry_after_s}))
    partitioner.view.stop()
    app.close()


if __name__ == "__main__":
    main()
