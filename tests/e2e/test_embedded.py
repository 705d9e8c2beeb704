"""With no broker URL, `partitioner launch` runs an embedded server producers find."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from dotenv import dotenv_values

from workers import control as shop_control

from .conftest import (
    ROOT,
    Launch,
    alive,
    command_env,
    command_line,
    kill,
    read_json,
    run_partitioner,
    wait_until,
)

pytestmark = pytest.mark.e2e

PRODUCE = """
import time
from workers.app import app
print(app.conf.broker_url)
print(app.send_task("shop.order.place", kwargs={"sent_at": time.time()}).id)
"""


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state folder of the test's own; a server left running in it is killed."""
    folder = tmp_path / "state"
    yield folder
    record = read_json(folder / "server.json")
    if record is not None:
        address = urlsplit(str(record["url"])).netloc
        if f"valkey-server {address}" in command_line(int(record["pid"])):
            kill([int(record["pid"])])


@pytest.mark.timeout(90)
def test_embedded_server_serves_launch_and_producers_then_stops(
    state_dir: Path, launcher: Launch
) -> None:
    if dotenv_values(ROOT / ".env").get("PARTITIONER_BROKER_URL"):
        pytest.skip(f"{ROOT / '.env'} sets PARTITIONER_BROKER_URL, which must be unset")

    # Given no broker URL anywhere, and a state folder of the test's own
    env = command_env(None, PARTITIONER_STATE_DIR=str(state_dir))
    # The shop's ledger then lives in the embedded server itself.
    del env["WORKERS_CONTROL_URL"]

    # When the launcher starts
    launched = launcher(env)

    # Then it records the embedded server it started in the state folder
    record = wait_until(lambda: read_json(state_dir / "server.json"), 20, "server.json")
    url, server_pid = str(record["url"]), int(record["pid"])
    assert url.startswith("redis://127.0.0.1:")
    assert alive(server_pid)

    # And a producer started with the same settings finds it, and its task runs
    store = redis.Redis.from_url(url, socket_timeout=5)
    produced = subprocess.run(
        [sys.executable, "-c", PRODUCE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    found_url, task_id = produced.stdout.split()
    assert found_url == url
    wait_until(
        lambda: any(e["id"] == task_id for e in shop_control.read_ledger(store)),
        45,
        "the producer's task to run",
    )
    store.close()

    # And `partitioner status` finds it too, with every partition's worker
    status = run_partitioner("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    workers = [p["workers"] for p in json.loads(status.stdout)["partitions"]]
    assert workers == [[name] for name in launched.workers]

    # And on SIGTERM the server stops with the workers, and forgets its record
    assert launched.stop() == 0, launched.log()
    assert "embedded server stopped" in launched.log()
    assert not (state_dir / "server.json").exists()
    assert not alive(server_pid)

    # And `partitioner status` then says so, instead of reading some other broker
    status = run_partitioner("status", env=env)
    assert status.returncode == 6, status.stdout
    assert f"no embedded server runs in {state_dir}" in status.stderr


@pytest.mark.timeout(90)
def test_server_left_by_a_killed_launcher_is_adopted_and_stopped(
    state_dir: Path, launcher: Launch
) -> None:
    # Given a launcher that started the embedded server, then was killed outright
    env = command_env(None, PARTITIONER_STATE_DIR=str(state_dir))
    del env["WORKERS_CONTROL_URL"]
    first = launcher(env)
    record = wait_until(lambda: read_json(state_dir / "server.json"), 20, "server.json")
    first.process.kill()
    first.process.wait(10)
    assert alive(int(record["pid"]))

    # When a new launcher starts in the same state folder
    second = launcher(env)

    # Then it adopts the same server, and names itself its owner
    def owned_by_second() -> dict[str, object] | None:
        found = read_json(state_dir / "server.json")
        return found if found and found["owner"] == second.pid else None

    adopted = wait_until(owned_by_second, 20, "the new launcher to adopt the server")
    assert (adopted["url"], adopted["pid"]) == (record["url"], record["pid"])
    wait_until(lambda: "adopting it" in second.log(), 10, "the adoption log line")

    # And stops it on its own shutdown
    assert second.stop() == 0, second.log()
    assert not alive(int(record["pid"]))
    assert not (state_dir / "server.json").exists()
