"""Shared fixtures: anyio on asyncio, a real PostgreSQL, a fresh database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from nproxyd.store.database import Database, create_pool
from tests.pg import TestServer
from tests.pgbouncer import SKIP_REASON, PgBouncer, binary


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A test that configures structlog must not leak its output stream into the next."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    server = TestServer()
    server.start()
    yield server


@pytest.fixture
async def dsn(pg_server: TestServer) -> AsyncIterator[str]:
    """A fresh, migrated database of its own for one test."""
    value = await pg_server.clone()
    yield value
    await pg_server.drop(value)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[Database]:
    pool = await create_pool(dsn, max_size=10, timeout_seconds=5)
    database = Database(pool)
    yield database
    await database.close()


@pytest.fixture(scope="session")
def pgbouncer(pg_server: TestServer) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction mode in front of the test server (skips without one)."""
    executable = binary()
    if executable is None:
        pytest.skip(SKIP_REASON)
    bouncer = PgBouncer(pg_server.admin_dsn).start(executable)
    yield bouncer
    bouncer.stop()
