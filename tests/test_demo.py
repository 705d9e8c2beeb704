"""`partitioner demo` end to end: embedded server, four partitions, payment hangs.

These run the real command, as a new user would on a machine with no broker installed, and
check the summary it prints and that it leaves no process behind. Every process the demo
starts inherits a marker variable, which is how the tests find any that outlived it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
SERVICES = ("order", "payment", "inventory", "notification")
HEALTHY = ("order", "inventory", "notification")
MARKER = "DEMO_TEST_MARKER"
# One summary row: service, then sent/done/p99 before the fault, and the same after it.
ROW = re.compile(r"^\s*(\w+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\S+)\s*$")


def demo_command(state_dir: Path, duration_s: float) -> list[str]:
    return [
        sys.executable, "-m", "partitioner", "demo",
        "--duration", str(duration_s),
        "--state-dir", str(state_dir),
    ]  # fmt: skip


def fresh_environment(marker: str) -> dict[str, str]:
    """This environment without any broker or shop setting, plus the marker."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PARTITIONER_", "WORKERS_"))
    }
    return env | {MARKER: marker, "PYTHONUNBUFFERED": "1"}


def leftover_processes(marker: str, output: str) -> list[str]:
    """`pid: command line` of each live process the demo that printed `output` started.

    Workers and the launcher carry the marker in their environment. The server rewrites its
    process title over its environment, so it is found by the port the demo printed.
    """
    port = re.search(r"broker redis://127\.0\.0\.1:(\d+)/", output)
    server_title = f"127.0.0.1:{port[1]}" if port else None
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue  # gone already, or another user's
        is_server = server_title is not None and "valkey" in command and server_title in command
        if f"{MARKER}={marker}".encode() in environ or is_server:
            found.append(f"{proc.name}: {command}")
    return found


def summary_rows(output: str) -> dict[str, tuple[int, int, int, int]]:
    """Per service from the summary: (sent before, done before, sent after, done after)."""
    summary = output.split("Summary", 1)[-1]
    rows = {}
    for line in summary.splitlines():
        match = ROW.match(line)
        if match and match[1] in SERVICES:
            rows[match[1]] = (int(match[2]), int(match[3]), int(match[5]), int(match[6]))
    return rows


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_demo_isolates_healthy_services_and_leaves_no_process(tmp_path: Path) -> None:
    # Given no broker configured anywhere and a fresh state folder
    marker = uuid.uuid4().hex

    # When the demo runs for 15 s of traffic
    result = subprocess.run(
        demo_command(tmp_path / "state", 15),
        cwd=PROJECT,
        env=fresh_environment(marker),
        capture_output=True,
        text=True,
        timeout=150,
    )

    # Then it ends well, with a summary of all four services
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rows = summary_rows(result.stdout)
    assert sorted(rows) == sorted(SERVICES), output

    # And the healthy services did every task they were sent, before and after the fault
    for name in HEALTHY:
        sent_before, done_before, sent_after, done_after = rows[name]
        assert sent_before > 0 and sent_after > 0, output
        assert (done_before, done_after) == (sent_before, sent_after), f"{name}: {output}"

    # While payment, whose dependency hung for 5 s a call, backed up
    _, _, payment_sent_after, payment_done_after = rows["payment"]
    assert payment_done_after < payment_sent_after / 2, output

    # And no worker, launcher or server it started is still running
    assert "broker redis://127.0.0.1:" in output
    assert leftover_processes(marker, output) == [], output
    assert not (tmp_path / "state" / "server.json").exists()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_demo_interrupted_stops_everything_it_started(tmp_path: Path) -> None:
    # Given a demo whose workers are up and whose traffic has begun
    marker = uuid.uuid4().hex
    demo = subprocess.Popen(
        demo_command(tmp_path / "state", 60),
        cwd=PROJECT,
        env=fresh_environment(marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    seen = []
    for line in demo.stdout:
        seen.append(line)
        if line.startswith("all workers answer"):
            break
    time.sleep(2)

    # When the user presses Ctrl-C
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=90)

    # Then it stops warmly, says so, and leaves no process behind
    output = "".join(seen) + rest
    assert demo.returncode == 130, output
    assert "interrupted: stopping the workers and the server" in output
    assert leftover_processes(marker, output) == [], output


@pytest.mark.timeout(30)
def test_demo_outside_the_project_folder_says_where_to_run_it(tmp_path: Path) -> None:
    # Given a folder without workers/ or config/partitioner.toml
    # When the demo is started there
    result = subprocess.run(
        [sys.executable, "-m", "partitioner", "demo", "--duration", "3"],
        cwd=tmp_path,
        env=fresh_environment(uuid.uuid4().hex),
        capture_output=True,
        text=True,
        timeout=25,
    )

    # Then it fails with one line that names the fix, and no traceback
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "run `partitioner demo` from the Partitioner project folder" in result.stderr
    assert "Traceback" not in result.stderr
