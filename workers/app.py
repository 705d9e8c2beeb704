"""The shop's Celery app with Partitioner attached.

This is all a service needs: keep the app and tasks as they are, then call `attach`.
Settings come from `PARTITIONER_CONFIG` (default: `config/partitioner.toml` of this
project), `.env` and `PARTITIONER_*` variables.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from partitioner import attach, load_settings

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "partitioner.toml"

app = Celery("shop", include=["workers.services"])
partitioner = attach(app, *load_settings(os.environ.get("PARTITIONER_CONFIG") or DEFAULT_CONFIG))
