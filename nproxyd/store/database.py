"""The asyncpg pool, and the one place where driver errors become the project's errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import asyncpg.pool

from nproxyd.core.errors import DatabaseUnavailable, StoreError
from nproxyd.store.sql import QUERIES

_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "57", "53")  # connection, operator intervention, resources


@contextmanager
def map_errors() -> Iterator[None]:
    """Translate asyncpg and socket errors into :class:`StoreError` subclasses."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        kind = type(exc).__name__
        if sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            raise DatabaseUnavailable(f"database unavailable: {kind} ({sqlstate})") from exc
        raise StoreError(f"database error {sqlstate}: {kind}: {exc}") from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


# Session settings for a direct connection. Behind a transaction pooler nothing may rely on
# session state: PgBouncer refuses unknown startup parameters (plan_cache_mode), and every
# statement runs unnamed there, which PostgreSQL plans with its values each time anyway.
# Timestamps travel as binary timestamptz, so no statement depends on the session time zone.
_DIRECT_SETTINGS = {
    "application_name": "nproxyd",
    "timezone": "UTC",
    # A generic plan cached while a table was small (a fresh install) would keep
    # scanning it sequentially once it is large; plan every execution instead.
    "plan_cache_mode": "force_custom_plan",
}
_POOLED_SETTINGS = {"application_name": "nproxyd"}
POOLERS = ("none", "pgbouncer")


async def create_pool(
    dsn: str, *, max_size: int, timeout_seconds: float, pooler: str = "none"
) -> asyncpg.Pool:
    """Open a pool; raises :class:`DatabaseUnavailable` when the server cannot be reached.

    With ``pooler="pgbouncer"`` (transaction pooling) no prepared statement outlives its
    statement (``statement_cache_size=0``) and no session setting is sent.
    """
    behind_pooler = pooler != "none"
    with map_errors():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            timeout=timeout_seconds,
            command_timeout=300,
            init=_init_connection,
            statement_cache_size=0 if behind_pooler else 100,
            server_settings=_POOLED_SETTINGS if behind_pooler else _DIRECT_SETTINGS,
        )
    return pool


async def connect_session(
    dsn: str, *, timeout_seconds: float, application_name: str = "nproxyd"
) -> asyncpg.Connection:
    """One connection of its own (never pooled), for what needs a session: locks, LISTEN."""
    with map_errors():
        connection: asyncpg.Connection = await asyncpg.connect(
            dsn,
            timeout=timeout_seconds,
            statement_cache_size=0,
            server_settings={**_DIRECT_SETTINGS, "application_name": application_name},
        )
    return connection


class Database:
    """Runs named statements on a pool, translating errors."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        with map_errors():
            return await self.pool.fetch(QUERIES[name], *args)

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        with map_errors():
            return await self.pool.fetchrow(QUERIES[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        with map_errors():
            return await self.pool.fetchval(QUERIES[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        with map_errors():
            return await self.pool.execute(QUERIES[name], *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        with map_errors():
            async with self.pool.acquire() as connection, connection.transaction():
                yield Transaction(connection)

    async def close(self) -> None:
        with map_errors():
            await self.pool.close()


class Transaction:
    """Named statements on one connection inside a transaction."""

    def __init__(self, connection: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
        self.connection = connection

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        return await self.connection.fetch(QUERIES[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self.connection.fetchval(QUERIES[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        return await self.connection.execute(QUERIES[name], *args)


def affected(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 12``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
