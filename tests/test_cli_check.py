"""The real `partitioner` command on bad and good settings: exit codes and output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from partitioner.cli import Exit, cli
from partitioner.settings import ENV_PREFIX
from tests.cases import BadCase, bad_cases

PROJECT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "partitioner.toml"
COMMAND_TIMEOUT_S = 30


def partitioner_command() -> str:
    """The console script installed next to the Python running the tests."""
    found = shutil.which("partitioner", path=str(Path(sys.executable).parent))
    assert found, f"no partitioner command next to {sys.executable}; pip install -e ."
    return found


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `partitioner ARGS` with no PARTITIONER_* variables but those in `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        [partitioner_command(), *args],
        cwd=cwd,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


@bad_cases
def test_check_refuses_bad_settings(case: BadCase, tmp_path: Path) -> None:
    config = case.write(tmp_path)
    options = ["--config", str(config)] if config else []

    done = run(*options, "check", cwd=tmp_path, env=dict(case.env))

    setting, source = case.expected(tmp_path)
    assert done.returncode == Exit.SETTINGS, done.stderr
    assert any(
        setting in line and source in line and case.says in line
        for line in done.stderr.splitlines()
    ), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if case.secret:
        assert case.secret not in done.stdout + done.stderr


def test_check_prints_partitions_and_budget(tmp_path: Path) -> None:
    done = run("--config", str(PROJECT_CONFIG), "check", cwd=tmp_path)

    assert done.returncode == Exit.OK, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line}
    for name in ("order", "payment", "inventory", "notification"):
        assert rows[name][1:3] == [f"shop.{name}.*", name]
    assert "budget: 4" in done.stdout
    assert "settings are valid" in done.stdout


def test_route_names_partition_and_queue(tmp_path: Path) -> None:
    args = ("--config", str(PROJECT_CONFIG), "route", "shop.payment.charge")

    done = run(*args, cwd=tmp_path)

    assert done.returncode == Exit.OK, done.stderr
    assert "-> partition payment, queue payment" in done.stdout


def test_route_of_an_unknown_task_names_it_and_the_setting(tmp_path: Path) -> None:
    done = run("--config", str(PROJECT_CONFIG), "route", "unknown.task", cwd=tmp_path)

    assert done.returncode == Exit.ROUTING
    assert "'unknown.task'" in done.stderr
    assert "partitions.<name>.tasks" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_env_overrides_the_config_file_in_check(tmp_path: Path) -> None:
    env = {"PARTITIONER_PARTITIONS__PAYMENT__MAX": "1", "PARTITIONER_BUDGET": "5"}

    done = run("--config", str(PROJECT_CONFIG), "check", cwd=tmp_path, env=env)

    assert done.returncode == Exit.OK, done.stderr
    assert "budget: 5" in done.stdout
    rows = done.stdout.splitlines()
    payment = next(row for row in rows if row.startswith("payment "))
    assert payment.split()[3:6] == ["1", "1", "1"]  # min, conc, max


COMMANDS = [[], *([name] for name in sorted(cli.commands))]


COMMAND_IDS = [" ".join(command) or "partitioner" for command in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=COMMAND_IDS)
def test_help(command: list[str], tmp_path: Path) -> None:
    done = run(*command, "--help", cwd=tmp_path)

    assert done.returncode == Exit.OK, done.stderr
    assert done.stdout.startswith(f"Usage: partitioner {' '.join(command)}".rstrip())
