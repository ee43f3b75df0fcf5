"""Fixtures for tests of the real nproxyd process (synchronous tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import TestServer
from tests.system.proc import Processes


@pytest.fixture
def system_dsn(pg_server: TestServer) -> Iterator[str]:
    """A fresh migrated database for one test of the nproxyd process."""
    dsn = asyncio.run(pg_server.clone("sys"))
    yield dsn
    asyncio.run(pg_server.drop(dsn))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Started nproxyd processes; whatever still runs at the end of the test is killed."""
    started = Processes(tmp_path / "logs")
    yield started
    started.kill_all()
