"""The conditions of a benchmark run, written beside its figures in the JSON results:
the command, the date, the versions, the code and the machine."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import celery
import kombu
import redis

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def conditions(scenario: str, argv: list[str], args: Namespace) -> dict[str, Any]:
    """The command that ran `scenario`, when, on what, with which options."""
    return command(scenario, argv) | {
        "versions": versions(),
        "code": code(),
        "machine": machine(),
        "options": options(args),
    }


def command(scenario: str, argv: list[str]) -> dict[str, Any]:
    """The scenario, the command that ran it, and when it started (UTC)."""
    return {
        "scenario": scenario,
        "command": shlex.join(["python", "-m", f"bench.{scenario}", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def versions() -> dict[str, str]:
    """The versions of Celery, kombu, redis-py and Python in this process."""
    return {
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "python": platform.python_version(),
    }


def machine() -> dict[str, Any]:
    """How many CPUs, on which platform."""
    return {"cpus": os.cpu_count(), "platform": platform.platform()}


def options(args: Namespace) -> dict[str, Any]:
    """The parsed options, paths as strings, fit for JSON."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def code() -> dict[str, Any]:
    """The commit the run started from, and the files of `partitioner/` changed since."""
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--", "partitioner").splitlines()
    files = [line.split(maxsplit=1)[-1] for line in changed]
    return {"commit": commit, "partitioner_changed": files}


def write(path: Path, data: dict[str, Any]) -> None:
    """Write the results as indented JSON, making the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    log.info("results written to %s", path)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()
