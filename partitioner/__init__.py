"""Partitioner: bulkheads for Celery.

Declare partitions in settings, call `attach(app)` on your Celery app, and run
`partitioner launch --app MODULE:ATTR`. Each partition's tasks go to its own queues and pool.
"""

from partitioner.app import Partitioner, attach
from partitioner.errors import (
    BrokerError,
    LaunchError,
    PartitionerError,
    RoutingError,
    SettingsError,
)
from partitioner.settings import Settings, load_settings

__all__ = [
    "BrokerError",
    "LaunchError",
    "Partitioner",
    "PartitionerError",
    "RoutingError",
    "Settings",
    "SettingsError",
    "attach",
    "load_settings",
]
__version__ = "0.1.0"
