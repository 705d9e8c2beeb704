"""Markdown tables of a benchmark's figures, fit to paste into the README."""

from __future__ import annotations

from collections.abc import Sequence

from bench.measure import ServiceResult

NOT_DONE = "not done"


def ms(value: float | None) -> str:
    """A latency for a table cell; `not done` when the tasks had not completed."""
    return NOT_DONE if value is None else f"{value:.0f}"


def completion(result: ServiceResult) -> str:
    """`145/150 (97 %)`."""
    return f"{result.completed}/{result.sent} ({result.completed_pct:.0f} %)"


def ratio(fault_ms: float | None, base_ms: float | None) -> float | None:
    """p99 under the fault over p99 without it; None when either is not a number."""
    if fault_ms is None or base_ms is None or base_ms <= 0:
        return None
    return fault_ms / base_ms


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def phase_table(title: str, results: Sequence[ServiceResult]) -> str:
    """One layout's figures in one phase, under a heading."""
    rows = [(r.service, completion(r), ms(r.p50_ms), ms(r.p99_ms)) for r in results]
    header = ("service", "completed/sent", "p50 ms", "p99 ms")
    return f"#### {title}\n\n{table(header, rows)}"


def ratio_cell(fault: ServiceResult, base: ServiceResult) -> str:
    """`31/27 ms = 1.15x`, or the part that is not a number."""
    found = ratio(fault.p99_ms, base.p99_ms)
    shown = f"{ms(fault.p99_ms)}/{ms(base.p99_ms)} ms"
    return shown if found is None else f"{shown} = {found:.2f}x"
