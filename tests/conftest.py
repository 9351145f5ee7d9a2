"""Shared fixtures: real processes, started per test and stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import MosquittoProcess


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private broker with persistence, for tests that stop or kill it."""
    with MosquittoProcess(tmp_path / "mosquitto") as broker:
        yield broker
