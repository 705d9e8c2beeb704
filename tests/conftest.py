"""Fixtures for the pure tests (no broker, no worker processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from partitioner.settings import ENV_PREFIX


@pytest.fixture
def hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PARTITIONER_* variables, and an empty working folder: no `.env` is read."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
