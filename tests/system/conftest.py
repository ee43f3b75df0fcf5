"""Fixtures for tests of the real nproxyd process (synchronous tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.pg import TestServer


@pytest.fixture
def system_dsn(pg_server: TestServer) -> Iterator[str]:
    """A fresh migrated database for one test of the nproxyd process."""
    dsn = asyncio.run(pg_server.clone("sys"))
    yield dsn
    asyncio.run(pg_server.drop(dsn))
