"""Per-service figures of one phase, from the shop's completion ledger.

A task counts as completed when the ledger holds its successful completion with
`done_at` at or before the phase's deadline (the end of its traffic window plus a
grace). Its latency is `done_at - sent_at`. A task not completed by the deadline has an
unknown latency longer than the window: percentiles that fall on such tasks are
reported as None ("not done"), never as a number that would flatter the layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.traffic import Sent


@dataclass(frozen=True)
class ServiceResult:
    """One service's figures in one phase; latencies in milliseconds."""

    service: str
    sent: int
    completed: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @property
    def completed_pct(self) -> float:
        """Share of sent tasks completed by the deadline, in percent."""
        return 100.0 * self.completed / self.sent if self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the JSON results."""
        return asdict(self) | {"completed_pct": round(self.completed_pct, 1)}


def measure(
    sent: Sequence[Sent], ledger: Iterable[dict[str, Any]], deadline: float
) -> list[ServiceResult]:
    """Figures per service, in the order services first appear in `sent`."""
    done_at = {
        entry["id"]: float(entry["done_at"])
        for entry in ledger
        if entry.get("ok") and float(entry["done_at"]) <= deadline
    }
    services = list(dict.fromkeys(task.service for task in sent))
    return [
        _figures(service, [t for t in sent if t.service == service], done_at)
        for service in services
    ]


def percentile(values_ms: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile `q` (0..100) of `values_ms`; None if it is not finite."""
    if not values_ms:
        return None
    ordered = sorted(values_ms)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    value = ordered[rank - 1]
    return round(value, 1) if math.isfinite(value) else None


def _figures(service: str, tasks: list[Sent], done_at: dict[str, float]) -> ServiceResult:
    latencies_ms = [_latency_ms(task, done_at) for task in tasks]
    completed = sum(1 for task in tasks if task.id in done_at)
    return ServiceResult(
        service=service,
        sent=len(tasks),
        completed=completed,
        p50_ms=percentile(latencies_ms, 50),
        p99_ms=percentile(latencies_ms, 99),
        max_ms=percentile(latencies_ms, 100),
    )


def _latency_ms(task: Sent, done_at: dict[str, float]) -> float:
    # A task not done by the deadline sorts above every finished one.
    if task.id not in done_at:
        return math.inf
    return (done_at[task.id] - task.sent_at) * 1000.0
