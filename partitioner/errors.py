"""The exceptions Partitioner raises: one root, a branch per subsystem."""

from __future__ import annotations


class PartitionerError(Exception):
    """Root of every error Partitioner raises on purpose."""


class SettingsError(PartitionerError, ValueError):
    """Settings are invalid; the message names each setting and its source."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid settings ({len(problems)} {noun}):\n{lines}")


class RoutingError(PartitionerError):
    """A task name cannot be routed to exactly one partition."""


class LaunchError(PartitionerError):
    """Workers or the embedded server could not be started."""


class BrokerError(PartitionerError):
    """The broker cannot be reached or answered unexpectedly."""


class BreakerError(PartitionerError):
    """A breaker cannot be read or changed."""


class StoreUnavailable(BreakerError):
    """The breaker store cannot be reached; the gates follow `on_store_error`."""


class PartitionOpen(BreakerError):
    """A task was rejected because its partition's breaker is open; retry after a while."""

    def __init__(self, partition: str, state: str, retry_after_s: float) -> None:
        self.partition = partition
        self.retry_after_s = retry_after_s
        super().__init__(
            f"partition {partition!r} is not accepting tasks (breaker {state}); "
            f"retry after {retry_after_s:.1f} s"
        )
