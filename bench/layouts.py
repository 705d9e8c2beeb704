"""The layouts a benchmark compares, as fleets: stock Celery and Partitioner.

All run the same task code (`workers.services`) on the same broker, each on its own
queues and under node names that no other process on the machine uses.

The apps are imported only when a fleet is built, after `environment()` is in force:
the Partitioner app reads its broker and settings file from the environment when it is
imported. A layout with settings of its own writes them to a TOML file in the run's
folder, which its workers and its app in the benchmark both read.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from celery import Celery
from kombu import Queue

from bench.fleet import Command, Fleet
from bench.traffic import TASK_NAMES
from partitioner import attach, load_settings
from partitioner.app import partitioner_of

REPO_ROOT = Path(__file__).resolve().parent.parent
STOCK_CONCURRENCY = 4
SHOP_BUDGET = 4


class Limits(NamedTuple):
    """One partition's `min`, `max` and starting `concurrency`."""

    min: int
    max: int
    concurrency: int


# Isolation with the supervisor on: the healthy services keep a process each whatever
# payment's backlog, payment may use the one process the budget has left.
SUPERVISED_LIMITS = {
    "order": Limits(1, 2, 1),
    "payment": Limits(0, 2, 1),
    "inventory": Limits(1, 2, 1),
    "notification": Limits(1, 2, 1),
}


# Shifting load and reaction: any one service may use the whole budget (see
# `bench.shifting` for why these are the limits a user would choose).
SHIFTING_LIMITS = {service: Limits(0, SHOP_BUDGET, 1) for service in TASK_NAMES}


def environment(broker_url: str, config: Path | None = None) -> dict[str, str]:
    """Variables that point all layouts, their workers and the ledger at the broker.

    `config`: the settings file of the Partitioner layouts that write none of their own.
    """
    found = {
        "BENCH_BROKER_URL": broker_url,
        "PARTITIONER_BROKER_URL": broker_url,
        "WORKERS_CONTROL_URL": broker_url,
    }
    if config is not None:
        found["PARTITIONER_CONFIG"] = str(config.resolve())
    return found


def unique_token() -> str:
    """A suffix for node names that no other worker on this machine has."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def stock_worker(
    node: str,
    queues: list[str],
    sizing: list[str],
    loglevel: str,
) -> list[str]:
    """A stock `celery worker` command line; `sizing` sets its prefork pool's size."""
    return [
        sys.executable, "-m", "celery", "-A", "bench.stock_app", "worker",
        "--hostname", node,
        "--queues", ",".join(queues),
        "--pool", "prefork",
        *sizing,
        "--prefetch-multiplier", "1",
        "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def stock_fleet(workdir: Path, token: str, loglevel: str) -> Fleet:
    """One stock `celery worker`: the shared queue, a prefork pool of 4, prefetch 1."""
    from bench.stock_app import QUEUE, app

    node = f"stock-{token}@{socket.gethostname()}"
    sizing = ["--concurrency", str(STOCK_CONCURRENCY)]
    command = stock_worker(node, [QUEUE], sizing, loglevel)
    return Fleet(
        title="stock Celery: one shared queue, prefork pool of 4",
        app=app,
        nodes=(node,),
        commands=(Command(command, workdir / "stock.log"),),
        env=dict(os.environ),
        cwd=REPO_ROOT,
    )


def service_queue(service: str) -> str:
    """The queue of one service's tasks in the stock layouts that route by service."""
    from bench.stock_app import QUEUE

    return f"{QUEUE}.{service}"


def routed_stock_app() -> Celery:
    """The stock app's broker and serialiser, each service's tasks on its own queue."""
    from bench.stock_app import app as shared

    queues = {service: service_queue(service) for service in TASK_NAMES}
    app = Celery("shop-stock-routed", broker=shared.conf.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(queue) for queue in queues.values()],
        task_routes={task: {"queue": queues[s]} for s, task in TASK_NAMES.items()},
        broker_connection_retry_on_startup=True,
    )
    return app


def routed_stock_fleet(
    workdir: Path, token: str, loglevel: str, per_service: bool, sizing: list[str]
) -> Fleet:
    """Stock workers on a queue per service: one worker for all, or one per service."""
    host = socket.gethostname()
    groups = [[s] for s in TASK_NAMES] if per_service else [list(TASK_NAMES)]
    nodes, commands = [], []
    for services in groups:
        name = services[0] if per_service else "all"
        node = f"stock-{name}-{token}@{host}"
        queues = [service_queue(s) for s in services]
        argv = stock_worker(node, queues, sizing, loglevel)
        nodes.append(node)
        commands.append(Command(argv, workdir / f"stock-{name}.log"))
    pools = "a worker per service" if per_service else "one worker"
    return Fleet(
        title=f"stock Celery: a queue per service, {pools}, {' '.join(sizing)}",
        app=routed_stock_app(),
        nodes=tuple(nodes),
        commands=tuple(commands),
        env=dict(os.environ),
        cwd=REPO_ROOT,
    )


def partitioner_app(config: Path) -> Celery:
    """A shop app with Partitioner attached by the settings of `config`."""
    app = Celery("shop", include=["workers.services"])
    attach(app, *load_settings(config))
    return app


def partitioner_fleet(
    workdir: Path,
    token: str,
    loglevel: str,
    config: Path | None = None,
    title: str | None = None,
) -> Fleet:
    """`partitioner launch` of the shop: a worker per partition, as the settings say.

    Without `config`, the settings are those `PARTITIONER_CONFIG` names.
    """
    env = dict(os.environ)
    if config is None:
        from workers.app import app
    else:
        app = partitioner_app(config)
        env["PARTITIONER_CONFIG"] = str(config.resolve())
    host = f"bench-{token}"
    log_dir = workdir / (config.stem if config is not None else "partitioner")
    command = [
        sys.executable, "-m", "partitioner", "launch",
        "--app", "workers.app:app",
        "--hostname", host,
        "--loglevel", loglevel,
        "--log-dir", str(log_dir),
    ]  # fmt: skip
    topology = partitioner_of(app).topology
    if title is None:
        sizes = ", ".join(f"{p.name} {p.concurrency}" for p in topology.partitions)
        budget = topology.budget
        title = f"Partitioner: partitions of concurrency {sizes}; budget {budget}"
    return Fleet(
        title=title,
        app=app,
        nodes=tuple(p.worker_name(host) for p in topology.partitions),
        commands=(Command(command, log_dir / "launcher.log"),),
        env=env,
        cwd=REPO_ROOT,
    )


def write_shop_config(
    path: Path,
    name: str,
    limits: Mapping[str, Limits],
    supervisor: Mapping[str, bool | float],
    budget: int = SHOP_BUDGET,
) -> Path:
    """Settings for the shop's partitions within `limits`, breakers off; returns `path`.

    Each partition owns `shop.<partition>.*`. The breakers are off so that a layout
    measures the pools and the supervisor alone. `name` keeps the supervisor's records
    in Redis apart from those of any layout that ran before on the same database.
    """
    lines = [f"budget = {budget}", f"name = {_toml(name)}", "", "[supervisor]"]
    lines += [f"{key} = {_toml(value)}" for key, value in supervisor.items()]
    for partition, limit in limits.items():
        lines += [
            "",
            f"[partitions.{partition}]",
            f"tasks = [{_toml(f'shop.{partition}.*')}]",
            *(f"{key} = {value}" for key, value in limit._asdict().items()),
            "",
            f"[partitions.{partition}.breaker]",
            "enabled = false",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def limited_fleet(
    workdir: Path,
    token: str,
    loglevel: str,
    limits: Mapping[str, Limits],
    supervisor: Mapping[str, bool | float],
) -> Fleet:
    """`partitioner launch` of the shop within `limits`, its settings in `workdir`."""
    name = f"bench-{token}"
    config = write_shop_config(workdir / "limits.toml", name, limits, supervisor)
    on = "on" if supervisor.get("enabled", True) else "off"
    shown = ", ".join(f"{name} {lim.min}..{lim.max}" for name, lim in limits.items())
    title = f"Partitioner, supervisor {on}: limits {shown}; budget {SHOP_BUDGET}"
    return partitioner_fleet(workdir, token, loglevel, config, title)


def supervised_fleet(workdir: Path, token: str, loglevel: str) -> Fleet:
    """`partitioner launch` with the supervisor on, within `SUPERVISED_LIMITS`."""
    supervisor = {"enabled": True}
    workdir = workdir / "supervised"
    return limited_fleet(workdir, token, loglevel, SUPERVISED_LIMITS, supervisor)


def _toml(value: bool | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the plain names used here
    return repr(value)


LAYOUTS = {
    "stock": stock_fleet,
    "partitioner": partitioner_fleet,
    "supervised": supervised_fleet,
}
