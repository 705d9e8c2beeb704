"""Switchable behaviour of the shop's dependencies: ok, slow, hang or fail.

A fault is read before every task from the control store (a Redis key per service), so that
a running demo or benchmark can switch it without restarting anything, and falls back to the
`WORKERS_FAULT_<SERVICE>` environment variable (e.g. `WORKERS_FAULT_PAYMENT=hang:5`).

    python -m workers.faults payment hang --seconds 5
    python -m workers.faults payment ok
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import redis

from workers import control

MODES = ("ok", "slow", "hang", "fail")
DEFAULT_SECONDS = {"ok": 0.0, "slow": 1.0, "hang": 30.0, "fail": 0.0}


class DependencyError(RuntimeError):
    """The service's dependency failed (the `fail` fault)."""


@dataclass(frozen=True)
class Fault:
    """What a service's dependency does now; `seconds` is how long slow or hang lasts."""

    mode: str = "ok"
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`hang`, `hang:5` or `slow:0.5` into a Fault; raises ValueError on a bad mode."""
        mode, _, seconds = text.strip().partition(":")
        if mode not in MODES:
            raise ValueError(f"unknown fault {mode!r}; use one of {', '.join(MODES)}")
        return cls(mode, float(seconds) if seconds else DEFAULT_SECONDS[mode])

    def __str__(self) -> str:
        return f"{self.mode}:{self.seconds:g}"


def current(service: str) -> Fault:
    """The fault in force for `service`: control store first, then the environment."""
    client = control.client()
    if client is not None:
        try:
            stored = client.get(control.key("fault", service))
        except redis.RedisError:
            stored = None
        if stored:
            return Fault.parse(stored.decode() if isinstance(stored, bytes) else str(stored))
    return Fault.parse(os.environ.get(f"WORKERS_FAULT_{service.upper()}", "ok"))


def set_fault(service: str, fault: Fault) -> None:
    """Switch `service`'s dependency to `fault` for every worker sharing the control store."""
    client = control.require_client()
    client.set(control.key("fault", service), str(fault))


def call_dependency(service: str, work_s: float) -> None:
    """Stand in for the service's dependency: do `work_s` of work, then apply the fault."""
    fault = current(service)
    if fault.mode in ("slow", "hang"):
        time.sleep(fault.seconds)
    else:
        time.sleep(work_s)
    if fault.mode == "fail":
        raise DependencyError(f"{service}: dependency failed (fault {fault})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Switch a shop service's dependency fault.")
    parser.add_argument("service", choices=("order", "payment", "inventory", "notification"))
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--seconds", type=float, default=None, help="duration of slow/hang")
    args = parser.parse_args()
    seconds = DEFAULT_SECONDS[args.mode] if args.seconds is None else args.seconds
    set_fault(args.service, Fault(args.mode, seconds))
    print(f"{args.service}: {args.mode} ({seconds:g} s)")


if __name__ == "__main__":
    main()
