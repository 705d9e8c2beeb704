"""The `partitioner` command: check, route, launch, status and demo."""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from celery import Celery

from partitioner.breaker.machine import State
from partitioner.errors import (
    BreakerError,
    BrokerError,
    LaunchError,
    PartitionerError,
    RoutingError,
    SettingsError,
)
from partitioner.routing import CELERY_BUILTIN_PREFIX
from partitioner.settings import CONFIG_ENV, Origins, Settings, load_settings, mask_url
from partitioner.topology import Topology


class Exit(enum.IntEnum):
    """Exit codes, so that scripts can tell failures apart."""

    OK = 0
    USAGE = 2
    SETTINGS = 3
    ROUTING = 4
    LAUNCH = 5
    BROKER = 6
    BREAKER = 7
    INTERRUPTED = 130


EXIT_FOR: list[tuple[type[PartitionerError], Exit]] = [
    (SettingsError, Exit.SETTINGS),
    (RoutingError, Exit.ROUTING),
    (LaunchError, Exit.LAUNCH),
    (BrokerError, Exit.BROKER),
    (BreakerError, Exit.BREAKER),
]


def _settings(ctx: click.Context) -> tuple[Settings, Origins]:
    if "settings" not in ctx.obj:
        ctx.obj["settings"] = load_settings(ctx.obj["config"])
    found: tuple[Settings, Origins] = ctx.obj["settings"]
    return found


@click.group(
    epilog="""\b
Example:
  partitioner --config config/partitioner.toml check
  partitioner --config config/partitioner.toml launch --app workers.app:app
  partitioner status --json
"""
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help=f"TOML settings file (or set {CONFIG_ENV}).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines.")
@click.pass_context
def cli(ctx: click.Context, config: Path | None, verbose: bool) -> None:
    """Partitioner: bulkheads for Celery.

    Settings come from the TOML file, `.env` and PARTITIONER_* environment variables
    (nested with __, e.g. PARTITIONER_PARTITIONS__PAYMENT__MAX=3); the environment wins.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config is not None:
        # Exported so that the app module's attach() and every worker read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve()) if config.exists() else str(config)
    # A file named by PARTITIONER_CONFIG is left to load_settings, so that its errors name
    # the variable rather than a --config option the user never typed.
    from_env = ctx.get_parameter_source("config") is click.core.ParameterSource.ENVIRONMENT
    ctx.obj = {"config": None if from_env else config}


@cli.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the settings and print the partitions, queues, limits and budget."""
    settings, origins = _settings(ctx)
    topology = Topology.from_settings(settings, origins)
    click.echo(f"broker: {mask_url(settings.broker_url)}")
    store = settings.state_url or "the broker, if Redis"
    click.echo(f"breaker state: {mask_url(store) if settings.state_url else store}")
    click.echo(f"budget: {topology.budget}")
    header = (
        "partition", "tasks", "queues", "min", "conc", "max", "pool", "prefetch", "breaker",
    )  # fmt: skip
    rows = [
        (
            p.name,
            ",".join(p.patterns) or "(unmatched)",
            ",".join(p.queues),
            str(p.min),
            str(p.concurrency),
            str(p.max),
            p.pool,
            str(p.prefetch),
            f"{p.breaker.on_open}, open {p.breaker.open_s:g} s" if p.breaker.enabled else "off",
        )
        for p in topology.partitions
    ]
    click.echo(_table(header, rows))
    if topology.default is None:
        click.echo(
            "note: Celery's own tasks (celery.chord_unlock, celery.backend_cleanup) go to "
            "Celery's default queue 'celery', which no partition consumes; declare "
            "[partitions.default] if you use chords or result expiry"
        )
    click.echo("settings are valid")


@cli.command()
@click.argument("task_name")
@click.pass_context
def route(ctx: click.Context, task_name: str) -> None:
    """Say which partition and queue TASK_NAME goes to."""
    settings, origins = _settings(ctx)
    topology = Topology.from_settings(settings, origins)
    try:
        found = topology.route(task_name)
    except RoutingError:
        if not task_name.startswith(CELERY_BUILTIN_PREFIX):
            raise
        click.echo(f"{task_name} -> Celery's default queue (no partition claims it)")
        return
    why = f"pattern {found.pattern!r}" if found.pattern else "no pattern matched: default"
    click.echo(f"{task_name} -> partition {found.partition.name}, queue {found.queue} ({why})")


@cli.command()
@click.option("--app", "app_spec", required=True, help="The Celery app, as MODULE:ATTR.")
@click.option("--hostname", default=None, help="Host part of worker names (default: this host).")
@click.option(
    "--loglevel",
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Workers' log level.",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write each partition's worker output to DIR/<partition>.log instead of here.",
)
@click.pass_context
def launch(
    ctx: click.Context, app_spec: str, hostname: str | None, loglevel: str, log_dir: Path | None
) -> None:
    """Run one worker per partition, resize and restart them, until SIGTERM or Ctrl-C.

    The supervisor resizes the pools within the limits every supervisor.interval_s. On
    SIGHUP, or when the settings file changes, new limits apply without a restart (an
    invalid edit is refused and logged). Run it on every host with its own --hostname and
    the same settings: one launcher leads, through a lease in Redis.

    With no broker set (PARTITIONER_BROKER_URL or the app's own), an embedded server runs in
    the state folder: started, or joined if another launcher runs it, or adopted if its
    launcher died; a launcher stops the server it started or adopted on exit.
    Example: partitioner launch --app workers.app:app
    """
    from partitioner.launch import launch as run_launch

    _settings(ctx)  # all settings are checked before any process starts
    ctx.exit(run_launch(app_spec, host=hostname, loglevel=loglevel, log_dir=log_dir))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Show each partition's queues, backlog, concurrency and limits, and the supervisor's
    leader, hosts and latest decisions.
    """
    from partitioner.app import attach
    from partitioner.observe import observe
    from partitioner.supervisor.loop import supervisor_status

    settings, origins = _settings(ctx)
    app = Celery("partitioner-status", set_as_current=False)
    partitioner = attach(app, settings, origins)
    observations = observe(partitioner, timeout_s=timeout)
    supervisor = supervisor_status(partitioner)
    if as_json:
        found = {"partitions": [o.as_dict() for o in observations], "supervisor": supervisor}
        click.echo(json.dumps(found, indent=2))
        return
    planned: dict[str, int] = {}
    for targets in supervisor["plan"].values():
        for name, target in targets.items():
            planned[name] = planned.get(name, 0) + target
    degraded: dict[str, list[str]] = {}
    for host in supervisor["hosts"]:
        for name in host["degraded"]:
            degraded.setdefault(name, []).append(host["name"])
    header = (
        "partition", "queues", "waiting", "reserved", "running", "backlog", "conc", "target",
        "limits", "breaker",
    )  # fmt: skip
    rows = [
        (
            o.name,
            ",".join(o.queues),
            str(o.waiting),
            str(o.reserved),
            str(o.running),
            str(o.backlog),
            str(o.concurrency) if o.workers else "-",
            str(planned.get(o.name, "-"))
            + (f" degraded on {','.join(degraded[o.name])}" if degraded.get(o.name) else ""),
            f"{o.min}..{o.max}",
            _breaker_cell(o.breaker),
        )
        for o in observations
    ]
    click.echo(_table(header, rows))
    click.echo(_supervisor_lines(supervisor))


def _supervisor_lines(supervisor: dict[str, Any]) -> str:
    if not supervisor["enabled"]:
        return "\nsupervisor: off (supervisor.enabled = false)"
    hosts = ", ".join(f"{h['name']} (budget {h['budget']})" for h in supervisor["hosts"])
    lines = [
        "",
        f"supervisor: leader {supervisor['leader'] or '(none)'}; hosts {hosts or '(none)'}; "
        f"cluster budget {supervisor['cluster_budget'] or 'none'}",
    ]
    if "error" in supervisor:
        lines.append(f"  {supervisor['error']}")
    if supervisor["decisions"]:
        lines.append("latest decisions, newest first:")
        for d in supervisor["decisions"]:
            at = time.strftime("%H:%M:%S", time.localtime(d["at"]))
            lines.append(
                f"  {at} {d['partition']}@{d['host']} {d['before']} -> {d['after']}: {d['reason']}"
            )
    return "\n".join(lines)


def _breaker_cell(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "off"
    if "calls" not in figures:
        return str(figures["state"])
    cell = f"{figures['state']} fail {figures['failure_rate']:.0%}"
    cell += f" slow {figures['slow_call_rate']:.0%} of {figures['calls']}"
    if figures["half_open_in_s"]:
        cell += f", half-open in {figures['half_open_in_s']:.1f} s"
    return cell


# action: (state, reason logged with the transition, keep the window of outcomes)
MANUAL_STATES = {
    "open": (State.FORCED_OPEN, "opened by hand", False),
    "close": (State.CLOSED, "closed by hand", True),
    "reset": (State.CLOSED, "reset by hand: outcomes and re-opens forgotten", False),
    "disable": (State.DISABLED, "disabled by hand", False),
    "metrics-only": (State.METRICS_ONLY, "set to metrics only by hand", False),
}


@cli.command(
    epilog="""\b
Actions:
  show          state, failure and slow-call rates, time to half-open
  open          forced_open: halt dispatch until closed by hand
  close         closed; outcomes in its window still count, and may re-open it
  reset         closed, its window of outcomes and its re-open count cleared
  disable       disabled: no recording, no gating
  metrics-only  record outcomes, never open

Example: partitioner breaker open payment
"""
)
@click.argument("action", type=click.Choice(["show", *MANUAL_STATES]))
@click.argument("partition")
@click.pass_context
def breaker(ctx: click.Context, action: str, partition: str) -> None:
    """Show a partition's breaker, or set its state by hand."""
    from partitioner.app import attach
    from partitioner.observe import breaker_figures

    settings, origins = _settings(ctx)
    attached = attach(Celery("partitioner-breaker", set_as_current=False), settings, origins)
    attached.find_broker()
    found = attached.topology.by_name.get(partition)
    if found is None:
        known = ", ".join(attached.topology.by_name)
        raise BreakerError(f"no partition {partition!r}; the partitions are {known}")
    if attached.breakers is None or not found.breaker.enabled:
        raise BreakerError(
            f"partition {partition!r} has no breaker: set PARTITIONER_STATE_URL to a Redis "
            f"URL, or partitions.{partition}.breaker.enabled = true"
        )
    if action == "show":
        snapshot = attached.breakers.snapshot(found)
    else:
        state, reason, keep_window = MANUAL_STATES[action]
        snapshot = attached.breakers.set(found, state, reason, keep_window)
    click.echo(json.dumps({"partition": partition, **breaker_figures(snapshot)}, indent=2))


@cli.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=3.0),
    default=40.0,
    show_default=True,
    help="Seconds of traffic; startup and shutdown add about 10 s.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the embedded server and the worker logs (default: settings' state_dir).",
)
def demo(duration: float, state_dir: Path | None) -> None:
    """Run the shop in workers/ under steady traffic, hang payment, and watch the others.

    Starts an embedded server (unless PARTITIONER_BROKER_URL is set), launches the four
    partitions of config/partitioner.toml, and shows each service's latency live. Run it
    from the project folder. With PARTITIONER_BROKER_URL set, it empties the shop's four
    queues and its shop:* keys on that broker, before and after: use a broker of its own.

    \b
    Example:
      partitioner demo --duration 20
    """
    from partitioner.demo import run_demo

    run_demo(duration, state_dir)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, turning Partitioner errors into one line and a code."""
    try:
        code = cli.main(args=argv, prog_name="partitioner", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(Exit.USAGE)
    except click.Abort:
        sys.exit(Exit.INTERRUPTED)
    except PartitionerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(next((c for kind, c in EXIT_FOR if isinstance(exc, kind)), Exit.LAUNCH))
    sys.exit(code if isinstance(code, int) else Exit.OK)
