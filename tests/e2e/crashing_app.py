"""The reference shop, except that its payment worker dies as it starts: a crash loop."""

from __future__ import annotations

import os

from workers.app import app

if os.environ.get("PARTITIONER_WORKER", "").startswith("payment@"):
    raise SystemExit("payment worker: simulated crash at start")

__all__ = ["app"]
