"""The layouts a benchmark compares, as fleets: stock Celery and Partitioner.

Both run the same task code (`workers.services`) on the same broker, each on its own
queues and under node names that no other process on the machine uses.

The apps are imported only when a fleet is built, after `environment()` is in force:
the Partitioner app reads its broker and settings file from the environment when it is
imported.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from bench.fleet import Fleet

REPO_ROOT = Path(__file__).resolve().parent.parent
STOCK_CONCURRENCY = 4


def environment(broker_url: str, config: Path) -> dict[str, str]:
    """Variables that point both layouts, their workers and the ledger at the broker."""
    return {
        "BENCH_BROKER_URL": broker_url,
        "PARTITIONER_BROKER_URL": broker_url,
        "PARTITIONER_CONFIG": str(config.resolve()),
        "WORKERS_CONTROL_URL": broker_url,
    }


def unique_token() -> str:
    """A suffix for node names that no other worker on this machine has."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def stock_fleet(workdir: Path, token: str, loglevel: str) -> Fleet:
    """One stock `celery worker`: the shared queue, a prefork pool of 4, prefetch 1."""
    from bench.stock_app import QUEUE, app

    node = f"stock-{token}@{socket.gethostname()}"
    command = [
        sys.executable, "-m", "celery", "-A", "bench.stock_app", "worker",
        "--hostname", node,
        "--queues", QUEUE,
        "--pool", "prefork",
        "--concurrency", str(STOCK_CONCURRENCY),
        "--prefetch-multiplier", "1",
        "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    return Fleet(
        title="stock Celery: one shared queue, prefork pool of 4",
        app=app,
        nodes=(node,),
        command=command,
        env=dict(os.environ),
        cwd=REPO_ROOT,
        log_path=workdir / "stock.log",
    )


def partitioner_fleet(workdir: Path, token: str, loglevel: str) -> Fleet:
    """`partitioner launch` of the shop: a worker per partition, as the settings say."""
    from workers.app import app, partitioner

    host = f"bench-{token}"
    topology = partitioner.topology
    command = [
        sys.executable, "-m", "partitioner", "launch",
        "--app", "workers.app:app",
        "--hostname", host,
        "--loglevel", loglevel,
        "--log-dir", str(workdir / "partitioner"),
    ]  # fmt: skip
    sizes = ", ".join(f"{p.name} {p.concurrency}" for p in topology.partitions)
    budget = topology.budget
    return Fleet(
        title=f"Partitioner: partitions of concurrency {sizes}; budget {budget}",
        app=app,
        nodes=tuple(p.worker_name(host) for p in topology.partitions),
        command=command,
        env=dict(os.environ),
        cwd=REPO_ROOT,
        log_path=workdir / "partitioner" / "launcher.log",
    )


LAYOUTS = {"stock": stock_fleet, "partitioner": partitioner_fleet}
