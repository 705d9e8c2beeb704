"""The supervisor on live workers: capacity follows backlog within the budget, one leader
across hosts, crash-looping partitions marked degraded, and limits changed while it runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from .conftest import (
    CONTROL_URL,
    TASKS,
    Broker,
    Control,
    Launch,
    Launched,
    command_line,
    run_partitioner,
    wait_until,
)

pytestmark = pytest.mark.e2e

INTERVAL_S = 0.3
LEASE_S = 2.0
# Order and inventory keep one process each; payment and notification share the other two.
LIMITS = """
name = "shop"
budget = 4
{extra}
[supervisor]
interval_s = {interval}
cooldown_s = 1
lease_s = {lease}

[partitions.order]
tasks = ["shop.order.*"]
max = 1

[partitions.payment]
tasks = ["shop.payment.*"]
min = 0
max = 3
concurrency = 0
breaker.enabled = false

[partitions.inventory]
tasks = ["shop.inventory.*"]
max = 1
{inventory}

[partitions.notification]
tasks = ["shop.notification.*"]
min = 0
max = 3
"""


def limits(folder: Path, extra: str = "", inventory: str = "") -> Path:
    path = folder / "limits.toml"
    text = LIMITS.format(extra=extra, interval=INTERVAL_S, lease=LEASE_S, inventory=inventory)
    path.write_text(text)
    return path


def status(env: Mapping[str, str]) -> dict[str, Any]:
    done = run_partitioner("status", "--json", "--timeout", "0.5", env=env)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def slots(found: Mapping[str, Any], host: str | None = None) -> dict[str, int]:
    """Each partition's concurrency now, on one host or on all."""
    sizes = {}
    for p in found["partitions"]:
        pools = [pool for pool in p["pools"] if host is None or pool["worker"].endswith(host)]
        sizes[p["name"]] = sum(pool["slots"] for pool in pools)
    return sizes


def send(producer: Celery, partition: str, count: int, work_s: float) -> None:
    for n in range(count):
        producer.send_task(
            TASKS[partition], kwargs={"order_id": n, "sent_at": time.time(), "work_s": work_s}
        )


def peak_running(ledger: list[dict[str, Any]]) -> int:
    """The most tasks that ran at once, from their start and end times."""
    edges = sorted([(e["started_at"], 1) for e in ledger] + [(e["done_at"], -1) for e in ledger])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.timeout(120)
def test_capacity_follows_backlog_within_the_budget_and_returns_when_idle(
    broker: Broker,
    control: Control,
    producer: Celery,
    environment: dict[str, str],
    launcher: Launch,
    tmp_path: Path,
) -> None:
    # Given partitions whose mins leave two processes of the budget to share
    env = environment | {"PARTITIONER_CONFIG": str(limits(tmp_path))}
    launched = launcher(env)
    launched.wait_ready(producer)
    wait_until(
        lambda: slots(status(env)) == {"order": 1, "payment": 0, "inventory": 1,
                                       "notification": 0},
        15, "idle partitions at their min",
    )  # fmt: skip

    # When notification gets a backlog, then payment gets one too
    send(producer, "notification", 12, work_s=0.4)
    wait_until(lambda: slots(status(env))["notification"] == 2, 10, "notification at 2")
    send(producer, "payment", 12, work_s=0.4)

    # Then the two share what is left, and payment takes it all once notification is done
    wait_until(lambda: slots(status(env))["payment"] == 2, 20, "payment at 2")
    wait_until(lambda: len(control.ledger()) == 24, 30, "all 24 tasks to complete")
    ledger = control.ledger()
    assert all(e["ok"] for e in ledger)  # none was killed by a shrink
    assert peak_running(ledger) <= 2

    # And both go back to their min once idle, keeping one idle process each
    wait_until(
        lambda: slots(status(env)) == {"order": 1, "payment": 0, "inventory": 1,
                                       "notification": 0},
        15, "idle partitions back at their min",
    )  # fmt: skip
    found = wait_until(lambda: _all_sized_1(status(env)), 10, "drained processes released")
    # And each change was logged once with its figures; status shows the latest ones
    latest: dict[str, int] = {}
    for d in found["supervisor"]["decisions"]:  # newest first
        latest.setdefault(d["partition"], d["after"])
    assert latest["payment"] == latest["notification"] == 0
    host = launched.host
    assert f"supervisor: notification@{host} 0 -> 2: backlog " in launched.log()
    assert re.search(f"supervisor: payment@{host} [01] -> 2: backlog ", launched.log())
    assert found["supervisor"]["leader"] == host


@pytest.mark.timeout(150)
def test_one_leader_across_hosts_keeps_the_cluster_budget_and_fails_over(
    control: Control,
    producer: Celery,
    launcher: Launch,
    tmp_path: Path,
    environment: dict[str, str],
    broker: Broker,
) -> None:
    # Given two hosts of budget 4 each on one broker, and a cluster budget of 6: the four
    # mins take 4, so the whole cluster has 2 to share. The hosts share the supervisor's
    # record in Redis: the broker, or on RabbitMQ the state store.
    env = environment | {
        "PARTITIONER_CONFIG": str(limits(tmp_path, extra="cluster_budget = 6")),
        "PARTITIONER_STATE_URL": CONTROL_URL,
    }
    first = launcher(env)
    second = launcher(env)
    first.wait_ready(producer)
    second.wait_ready(producer)
    found = wait_until(lambda: _both_hosts(status(env)), 15, "both hosts in status")
    leader = found["supervisor"]["leader"]
    assert leader in (first.host, second.host)

    # When notification gets more backlog than one host's share
    send(producer, "notification", 16, work_s=0.5)

    # Then the cluster runs it within the cluster budget, never above
    peak = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        peak = max(peak, sum(slots(status(env)).values()))
    assert peak == 6

    # When the leader dies without a word
    leading = first if leader == first.host else second
    other = second if leading is first else first
    os.kill(leading.pid, signal.SIGKILL)
    died = time.time()

    # Then the other host leads within the lease and a control interval or two
    wait_until(lambda: status(env)["supervisor"]["leader"] == other.host, 10, "a new leader")
    took_over_s = _leads_at(other) - died
    assert took_over_s <= LEASE_S + 2 * INTERVAL_S + 0.5, took_over_s
    wait_until(lambda: len(control.ledger()) == 16, 40, "every notification task to complete")
    assert all(e["ok"] for e in control.ledger())


def _all_sized_1(found: dict[str, Any]) -> dict[str, Any] | None:
    # Every pool down to one process: its minimum, or the idle one kept at 0.
    return found if {p["size"] for p in found["partitions"]} == {1} else None


def _leads_at(launched: Launched) -> float:
    """When the launcher's log last says it leads: `2026-12-03 18:48:58,931 INFO ...`."""
    line = [line for line in launched.log().splitlines() if " leads;" in line][-1]
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _both_hosts(found: dict[str, Any]) -> dict[str, Any] | None:
    supervisor = found["supervisor"]
    return found if len(supervisor["hosts"]) == 2 and supervisor["leader"] else None


@pytest.mark.timeout(90)
def test_a_crash_looping_partition_is_degraded_and_the_others_run(
    control: Control,
    producer: Celery,
    launcher: Launch,
    tmp_path: Path,
    environment: dict[str, str],
) -> None:
    # Given a payment worker that dies as it starts, every time
    env = environment | {
        "PARTITIONER_CONFIG": str(limits(tmp_path)),
        "PARTITIONER_SUPERVISOR__CRASH_LOOP_RESTARTS": "2",
    }
    launched = launcher(env, "--app", "tests.e2e.crashing_app:app")

    # When it has died twice in a row
    wait_until(lambda: "payment: degraded" in launched.log(), 30, "payment marked degraded")

    # Then status says so, and the other partitions run their tasks
    found = wait_until(
        lambda: (s := status(env))["supervisor"]["hosts"] and s, 10, "the host's heartbeat"
    )
    assert found["supervisor"]["hosts"][0]["degraded"] == ["payment"]
    send(producer, "order", 3, work_s=0.05)
    wait_until(lambda: len(control.ledger()) == 3, 20, "the order tasks to complete")
    done = run_partitioner("status", env=env)
    assert "degraded on " + launched.host in done.stdout


@pytest.mark.timeout(90)
def test_changed_limits_apply_and_a_bad_edit_is_refused(
    control: Control,
    producer: Celery,
    launcher: Launch,
    tmp_path: Path,
    environment: dict[str, str],
) -> None:
    # Given a running launcher, and notification with a backlog at its share of 2
    path = limits(tmp_path)
    env = environment | {"PARTITIONER_CONFIG": str(path)}
    launched = launcher(env)
    launched.wait_ready(producer)
    send(producer, "notification", 30, work_s=0.5)
    wait_until(lambda: slots(status(env))["notification"] == 2, 10, "notification at 2")

    # When its max is lowered in the file and the launcher is told with SIGHUP
    path.write_text(path.read_text().replace("max = 3\n", "max = 1\n"))
    launched.process.send_signal(signal.SIGHUP)

    # Then the new limit applies without a restart
    wait_until(lambda: slots(status(env))["notification"] == 1, 10, "notification at 1")
    assert "partitions.notification.max 3 -> 1" in launched.log()

    # When an edit breaks the file, found by its change alone
    applied = path.read_text()
    path.write_text(applied.replace("budget = 4", "budget = 0"))

    # Then it is refused with the reason, and the running limits stay
    wait_until(lambda: "refused" in launched.log(), 10, "the refusal")
    assert "budget = 0" in launched.log()
    assert launched.process.poll() is None
    kept = tmp_path / "applied.toml"
    kept.write_text(applied)
    assert slots(status(env | {"PARTITIONER_CONFIG": str(kept)}))["notification"] == 1


@pytest.mark.timeout(90)
def test_a_threads_pool_is_drained_and_restarted_at_its_new_size(
    control: Control,
    producer: Celery,
    launcher: Launch,
    tmp_path: Path,
    environment: dict[str, str],
) -> None:
    # Given inventory on a threads pool that may grow to 2
    path = limits(tmp_path, inventory='pool = "threads"\nmax = 2\nconcurrency = 1')
    path.write_text(path.read_text().replace("max = 1\npool", "pool"))
    env = environment | {"PARTITIONER_CONFIG": str(path)}
    launched = launcher(env)
    launched.wait_ready(producer)
    first_pid = launched.worker_pid("inventory")

    # When it gets a backlog
    send(producer, "inventory", 8, work_s=0.5)

    # Then its worker drains, restarts with two threads, and no task is lost or killed
    wait_until(
        lambda: "--concurrency 2" in _command_of(launched, "inventory"), 20,
        "inventory restarted at concurrency 2",
    )  # fmt: skip
    assert launched.worker_pid("inventory") != first_pid
    wait_until(lambda: len(control.ledger()) == 8, 30, "the inventory tasks to complete")
    assert all(e["ok"] for e in control.ledger())


def _command_of(launched: Launched, partition: str) -> str:
    pid = launched.worker_pid(partition)
    return command_line(pid) if pid else ""
