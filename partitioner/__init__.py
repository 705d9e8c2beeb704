"""Partitioner: bulkheads for Celery.

Declare partitions in settings, call `attach(app)` on your Celery app, and run
`partitioner launch --app MODULE:ATTR`. Each partition's tasks go to its own queues and pool.
"""

from partitioner.app import Partitioner, attach
from partitioner.errors import (
    BreakerError,
    BrokerError,
    LaunchError,
    PartitionerError,
    PartitionOpen,
    RoutingError,
    SettingsError,
    StoreUnavailable,
)
from partitioner.settings import Settings, load_settings

__all__ = [
    "BreakerError",
    "BrokerError",
    "LaunchError",
    "PartitionOpen",
    "Partitioner",
    "PartitionerError",
    "RoutingError",
    "Settings",
    "SettingsError",
    "StoreUnavailable",
    "attach",
    "load_settings",
]
__version__ = "0.1.0"
