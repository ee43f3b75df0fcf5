"""What a pooled connection costs when it goes back to the pool (docs/benchmarks.md
"Start-up"): no reset query, while an open transaction is still rolled back, and no
pooled connection ever holds session state (the migration lock has a session of its own)."""

from __future__ import annotations

import asyncpg
import pytest

from nproxyd.store.database import create_pool
from nproxyd.store.migrate import migrate_pool
from tests.pg import TestServer, with_database

pytestmark = pytest.mark.anyio


async def _activity(dsn: str, pid: int) -> tuple[str, str]:
    """The state and last statement of backend ``pid``, seen from another session."""
    observer = await asyncpg.connect(dsn)
    try:
        row = await observer.fetchrow(
            "SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid
        )
    finally:
        await observer.close()
    assert row is not None
    return row["state"], row["query"]


async def test_a_released_connection_is_sent_no_reset_query(dsn: str) -> None:
    """Releasing a pooled connection sends nothing (asyncpg's reset query, one round trip
    per release, is left out): the backend's last statement is still the caller's."""
    pool = await create_pool(dsn, max_size=1, timeout_seconds=5)
    try:
        async with pool.acquire() as connection:
            pid = await connection.fetchval("SELECT pg_backend_pid()")
        assert await _activity(dsn, pid) == ("idle", "SELECT pg_backend_pid()")
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_still_rolled_back_on_release(dsn: str) -> None:
    """A connection released inside a transaction comes back idle, its writes undone."""
    pool = await create_pool(dsn, max_size=1, timeout_seconds=5)
    try:
        async with pool.acquire() as connection:
            pid = await connection.fetchval("SELECT pg_backend_pid()")
            await connection.execute("BEGIN")
            await connection.execute("CREATE TABLE left_open (id int)")
        assert (await _activity(dsn, pid))[0] == "idle"
        async with pool.acquire() as connection:
            assert await connection.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await pool.close()


async def test_a_pending_migration_takes_its_session_lock_outside_the_pool(
    pg_server: TestServer,
) -> None:
    """Migrating an empty database through a pool of sessions applies every migration on a
    connection of its own: the pooled connection only read the schema's version, so no
    session lock ever sits on a pooled connection that is sent no reset query."""
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute("DROP DATABASE IF EXISTS nproxyd_pool_migrate WITH (FORCE)")
        await admin.execute("CREATE DATABASE nproxyd_pool_migrate")
        dsn = with_database(pg_server.admin_dsn, "nproxyd_pool_migrate")
        pool = await create_pool(dsn, max_size=1, timeout_seconds=5)
        try:
            async with pool.acquire() as connection:
                pid = await connection.fetchval("SELECT pg_backend_pid()")
            applied = await migrate_pool(
                pool, dsn=dsn, direct_dsn="", sessions=True, connect_timeout_seconds=5
            )
            last = await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
            locks = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory'", pid
            )
        finally:
            await pool.close()
        assert applied
        assert "nproxyd_schema_migrations" in last
        assert "advisory" not in last
        assert locks == 0
    finally:
        await admin.execute("DROP DATABASE IF EXISTS nproxyd_pool_migrate WITH (FORCE)")
        await admin.close()
