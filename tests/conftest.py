"""Shared fixtures: anyio on asyncio, a real PostgreSQL, a fresh database per test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from nproxyd.store.database import Database, create_pool
from tests.pg import TestServer
from tests.pgbouncer import SKIP_REASON, PgBouncer, binary
from tests.renewal_checks import Channel


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A test that configures logging must not leak its output stream into the next.

    That includes the standard library's root handler, which would otherwise print other
    libraries' records (pgserver's clean-up at exit) as JSON after pytest's summary.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


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


async def open_database(dsn: str, max_size: int) -> Database:
    """The store's database over a pool of at most ``max_size`` connections to ``dsn``."""
    return Database(await create_pool(dsn, max_size=max_size, timeout_seconds=5))


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[Database]:
    database = await open_database(dsn, 10)
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


@pytest.fixture
async def channel() -> AsyncIterator[Channel]:
    """The actors' in-process channel, closed after the test."""
    value = Channel()
    yield value
    value.outbox.sender.close()
    value.receiver.close()
