"""Versioned schema migrations, applied in order under an advisory lock.

Each ``NNNN_name.sql`` file in ``nproxyd/store/migrations`` is one version. A file whose first
line is ``-- nproxyd:no-transaction`` runs statement by statement outside a transaction (for
``CREATE INDEX CONCURRENTLY``); every other file runs in one transaction together with its
record in ``nproxyd_schema_migrations``. Concurrent runs serialise on the advisory lock, and a
re-run applies nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from nproxyd.core.clock import SystemClock
from nproxyd.core.errors import MigrationError
from nproxyd.store.database import map_errors

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
    connection: Connection, *, sleep: Callable[[float], Awaitable[None]] | None = None
) -> list[int]:
    """Apply every pending migration; returns the versions applied by this call."""
    with map_errors():
        await _take_lock(connection, sleep or SystemClock().sleep)
        try:
            await connection.execute(_CREATE_TABLE)
            return await _apply_pending(connection)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


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
