"""Versioned schema migrations, applied in order under an advisory lock.

Each ``NNNN_name.sql`` file in ``nproxyd/store/migrations`` is one version. A file whose first
line is ``-- nproxyd:no-transaction`` runs statement by statement outside a transaction (for
``CREATE INDEX CONCURRENTLY``); every other file runs in one transaction together with its
record in ``nproxyd_schema_migrations``. Concurrent runs serialise on the advisory lock, and a
re-run applies nothing.

Behind a transaction pooler (PgBouncer) a session lock would stay on whichever server
connection happened to run it, so there the lock is transaction-level, held by a transaction
left open on a second connection for the whole run (``lock_connection``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from nproxyd.core.clock import SystemClock
from nproxyd.core.errors import MigrationError
from nproxyd.store.database import connect_session, map_errors

NO_TRANSACTION = "-- nproxyd:no-transaction"
Connection = asyncpg.Connection | PoolConnectionProxy
_LOCK_KEY = 0x6E70726F  # "npro": the advisory lock every migrating process takes
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS nproxyd_schema_migrations (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(NO_TRANSACTION)


def available() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("nproxyd.store").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            text = entry.read_text(encoding="utf-8")
            found.append(Migration(int(match.group(1)), match.group(2), text))
    return sorted(found, key=lambda migration: migration.version)


def statements(sql: str) -> list[str]:
    """Split a migration into statements (``;`` at a line end; no functions with bodies)."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [part.strip() for part in re.split(r";\s*$", body, flags=re.MULTILINE) if part.strip()]


async def migrate(
    connection: Connection,
    *,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    lock_connection: Connection | None = None,
) -> list[int]:
    """Apply every pending migration; returns the versions applied by this call.

    With ``lock_connection`` the lock is a transaction-level one held on that connection
    (for a transaction pooler); ``connection`` then never needs a session of its own.
    """
    wait = sleep or SystemClock().sleep
    with map_errors():
        if await _up_to_date(connection):
            return []  # nothing pending: no lock to take (every start checks this)
        if lock_connection is not None:
            async with _transaction_lock(lock_connection, wait):
                return await _create_and_apply(connection)
        await _take_lock(connection, wait)
        try:
            return await _create_and_apply(connection)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate_pool(
    pool: asyncpg.Pool,
    *,
    dsn: str,
    direct_dsn: str,
    sessions: bool,
    connect_timeout_seconds: float,
) -> list[int]:
    """Migrate the database behind ``pool`` (at ``dsn``), on a session wherever one is possible.

    ``direct_dsn`` (a connection around the pooler) is used when set; else, when the pool's
    connections are sessions (``sessions``, no transaction pooler), an up-to-date schema is
    checked on a pooled connection and a pending migration runs on a connection of its own
    at ``dsn``: its lock is a session's, and a pooled connection never keeps session state
    (:func:`~nproxyd.store.database.create_pool` skips asyncpg's reset query); else two pooled
    connections, one holding the lock in an open transaction.
    """
    if not direct_dsn and sessions:
        async with pool.acquire() as pooled:
            with map_errors():
                if await _up_to_date(pooled):
                    return []  # one read, no lock (every start checks this)
    if direct_dsn or sessions:
        connection = await connect_session(
            direct_dsn or dsn, timeout_seconds=connect_timeout_seconds
        )
        try:
            return await migrate(connection)
        finally:
            with map_errors():
                await connection.close()
    async with pool.acquire() as lock, pool.acquire() as pooled:
        return await migrate(pooled, lock_connection=lock)


async def _create_and_apply(connection: Connection) -> list[int]:
    await connection.execute(_CREATE_TABLE)
    return await _apply_pending(connection)


# The simple query protocol on purpose: a transaction that ran an extended-protocol statement
# keeps a snapshot xmin while idle, and CREATE INDEX CONCURRENTLY would wait for it forever.
_TRY_XACT_LOCK = f"""
DO $$ BEGIN
    IF NOT pg_try_advisory_xact_lock({_LOCK_KEY}) THEN
        RAISE EXCEPTION 'migration lock busy' USING ERRCODE = 'lock_not_available';
    END IF;
END $$"""


@asynccontextmanager
async def _transaction_lock(
    connection: Connection, sleep: Callable[[float], Awaitable[None]]
) -> AsyncIterator[None]:
    """Hold the migration lock in a transaction open on ``connection`` until the block ends.

    Polled like :func:`_take_lock`, each try in a transaction of its own, so a waiter holds
    nothing between tries. The holder then sits idle in its transaction without a snapshot,
    which ``CREATE INDEX CONCURRENTLY`` on the other connection does not wait for.
    """
    delay = 0.05
    while True:
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute(_TRY_XACT_LOCK)
            break
        except asyncpg.LockNotAvailableError:
            await transaction.rollback()
        await sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        await transaction.rollback()


async def _take_lock(connection: Connection, sleep: Callable[[float], Awaitable[None]]) -> None:
    """Poll for the advisory lock instead of blocking in a statement.

    A migrator waiting inside ``pg_advisory_lock`` holds a snapshot open, and the holder's
    ``CREATE INDEX CONCURRENTLY`` waits for every such snapshot: a deadlock. Between polls the
    waiting connection holds nothing.
    """
    delay = 0.05
    while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        await sleep(delay)
        delay = min(delay * 2, 1.0)


async def _up_to_date(connection: Connection) -> bool:
    """Whether every shipped migration is recorded (one read; False without the table)."""
    try:
        done = await applied_versions(connection)
    except asyncpg.UndefinedTableError:
        return False
    return all(migration.version in done for migration in available())


async def applied_versions(connection: Connection) -> set[int]:
    rows = await connection.fetch("SELECT version FROM nproxyd_schema_migrations")
    return {row["version"] for row in rows}


async def _apply_pending(connection: Connection) -> list[int]:
    done = await applied_versions(connection)
    applied = []
    for migration in available():
        if migration.version in done:
            continue
        try:
            await _apply(connection, migration)
        except asyncpg.PostgresError as exc:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} failed: {exc}"
            ) from exc
        applied.append(migration.version)
    return applied


async def _apply(connection: Connection, migration: Migration) -> None:
    record = "INSERT INTO nproxyd_schema_migrations (version, name) VALUES ($1, $2)"
    if migration.transactional:
        async with connection.transaction():
            await connection.execute(migration.sql)
            await connection.execute(record, migration.version, migration.name)
        return
    for statement in statements(migration.sql):
        await _drop_invalid_index(connection, statement)
        await connection.execute(statement)
    await connection.execute(record, migration.version, migration.name)


async def _drop_invalid_index(connection: Connection, statement: str) -> None:
    """A CONCURRENTLY build that was interrupted leaves an invalid index: drop it first."""
    match = re.search(r"INDEX CONCURRENTLY IF NOT EXISTS (\w+)", statement)
    if not match:
        return
    invalid = await connection.fetchval(
        "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c "
        "ON c.oid = i.indexrelid WHERE c.relname = $1 AND NOT i.indisvalid",
        match.group(1),
    )
    if invalid:
        await connection.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{match.group(1)}"')
