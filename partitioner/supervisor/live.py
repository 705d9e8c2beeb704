"""Live limits: a changed settings file is read, validated and applied by a running launcher.

Only limits and timing change live: `budget`, `cluster_budget`, `shutdown_timeout_s`, the
`supervisor` table and each partition's `min`, `max` and `concurrency`. Anything else (the
broker, the partitions and their tasks, queues, pools, breakers) is read by producers and
workers when they start, so an edit to it is refused as a whole and the running settings
stay, until `partitioner launch` is restarted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partitioner.errors import SettingsError
from partitioner.settings import Settings, load_settings
from partitioner.topology import Topology

LIVE = frozenset({"budget", "cluster_budget", "shutdown_timeout_s", "supervisor"})
LIVE_IN_PARTITION = frozenset({"min", "max", "concurrency"})


def reload(current: Settings, config: Path | None) -> tuple[Settings, Topology, list[str]]:
    """The new settings and topology, and what changed in words (empty: nothing did).

    Raises `SettingsError` for invalid settings, or for a change that needs a restart.
    """
    settings, origins = load_settings(config)
    topology = Topology.from_settings(settings, origins)
    frozen = [name for name, _, _ in _changes(current, settings) if not _is_live(name)]
    if frozen:
        raise SettingsError(
            [f"{name} changed; it takes effect only when launch restarts" for name in frozen]
        )
    changed = [f"{name} {old!r} -> {new!r}" for name, old, new in _changes(current, settings)]
    return settings, topology, changed


def _is_live(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "partitions":
        return len(parts) == 3 and parts[2] in LIVE_IN_PARTITION
    return parts[0] in LIVE


def _changes(old: Settings, new: Settings) -> list[tuple[str, Any, Any]]:
    return _diff("", old.model_dump(mode="json"), new.model_dump(mode="json"))


def _diff(prefix: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(old.keys() | new.keys()):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append((name, old.get(key), new.get(key)))
            else:
                found.extend(_diff(name, old[key], new[key]))
        return found
    return [] if old == new else [(prefix, old, new)]
