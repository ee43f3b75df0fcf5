"""The asyncpg pool, and the one place where driver errors become the project's errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import asyncpg
import asyncpg.pool
from asyncpg import connect_utils

from nproxyd.core.errors import (
    DatabaseRefused,
    DatabaseUnavailable,
    LockUnavailable,
    StoreDataError,
    StoreError,
)
from nproxyd.core.text import storable
from nproxyd.store.sql import bind

_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "57", "53")  # connection, operator intervention, resources
_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout expired, or NOWAIT
_DATA_SQLSTATE_CLASS = "22"  # data exception: a value the statement was given or read is bad
_MAX_DATA_ERROR = 300  # characters of a data error kept (the driver may quote whole arguments)
# What only the operator can fix: the server refused the configured credentials, role or
# database. Reasons name no user, password or database (the DSN is a secret).
_REFUSED_SQLSTATES = {
    "28P01": "the server refused the password (authentication failed)",
    "28000": "the server refused the role or its authentication (unknown role or no pg_hba entry)",
    "3D000": "the configured database does not exist",
    "42501": "the configured role lacks a privilege nproxyd needs (insufficient privilege)",
}


@contextmanager
def map_errors() -> Iterator[None]:
    """Translate asyncpg and socket errors into :class:`StoreError` subclasses."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        kind = type(exc).__name__
        if sqlstate in _REFUSED_SQLSTATES:
            raise DatabaseRefused(f"{_REFUSED_SQLSTATES[sqlstate]} ({kind})") from exc
        if sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            raise DatabaseUnavailable(f"database unavailable: {kind} ({sqlstate})") from exc
        if sqlstate == _LOCK_NOT_AVAILABLE:
            raise LockUnavailable(f"row lock not available: {kind}") from exc
        if sqlstate[:2] == _DATA_SQLSTATE_CLASS:
            raise _data_error(f"{sqlstate}: {kind}: {exc}") from exc
        raise StoreError(f"database error {sqlstate}: {kind}: {exc}") from exc
    except asyncpg.DataError as exc:
        # Raised before sending, while encoding an argument; its text quotes the whole argument,
        # so only the encoder's reason is kept.
        reason = exc.__cause__ or "cannot encode"
        raise _data_error(f"invalid statement argument: {reason}") from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    except (OverflowError, UnicodeError, ValueError) as exc:
        # A value the driver could not encode or decode (e.g. a year Python cannot hold).
        raise _data_error(f"{type(exc).__name__}: {exc}") from exc


def _data_error(detail: str) -> StoreDataError:
    return StoreDataError(storable(f"database rejected the data: {detail}", _MAX_DATA_ERROR))


def driver_dsn_problem(dsn: str, secrets: list[str]) -> str | None:
    """Why asyncpg's own DSN parser refuses ``dsn`` (e.g. a missing root certificate for
    ``sslmode=verify-full``), with every secret removed; None when it accepts it."""
    try:
        connect_utils._parse_connect_dsn_and_args(  # type: ignore[attr-defined]
            dsn=dsn,
            host=None,
            port=None,
            user=None,
            password=None,
            passfile=None,
            database=None,
            ssl=None,
            service=None,
            servicefile=None,
            direct_tls=None,
            server_settings=None,
            target_session_attrs=None,
            krbsrvname=None,
            gsslib=None,
        )
    except asyncpg.ClientConfigurationError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        if not reason or any(secret in reason for secret in secrets if secret):
            reason = f"not a DSN the driver accepts ({type(exc).__name__})"
        return reason
    except Exception as exc:
        return f"not a DSN the driver accepts ({type(exc).__name__})"
    return None


@contextmanager
def _refused_dsn() -> Iterator[None]:
    """A DSN the driver cannot parse is a configuration error (never shown: it is a secret)."""
    try:
        yield
    except asyncpg.ClientConfigurationError as exc:
        raise DatabaseRefused(f"not a DSN the driver accepts ({type(exc).__name__})") from None
    except ValueError as exc:
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            raise
        raise DatabaseRefused(f"not a DSN the driver accepts ({type(exc).__name__})") from None


async def _keep_no_session_state(connection: asyncpg.Connection) -> None:
    """A pooled connection's reset when released: nothing beyond what asyncpg always does
    then (roll back an open transaction, drop listeners).

    Pooled statements keep no session state: no session advisory lock, session setting,
    cursor outside a transaction or LISTEN; what needs one has a connection of its own
    (:func:`connect_session`: the migration lock, LISTEN). So asyncpg's reset query
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), one more round trip
    on every release, is left out (docs/benchmarks.md "Start-up").
    """


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
    """Open a pool; raises :class:`DatabaseUnavailable` when the server cannot be reached and
    :class:`DatabaseRefused` when it refuses the credentials, role or database.

    With ``pooler="pgbouncer"`` (transaction pooling) no prepared statement outlives its
    statement (``statement_cache_size=0``) and no session setting is sent.
    """
    behind_pooler = pooler != "none"
    with map_errors(), _refused_dsn():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            timeout=timeout_seconds,
            command_timeout=300,
            init=_init_connection,
            reset=_keep_no_session_state,
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
    """Runs named statements on a pool, translating errors.

    A statement written with ``$n`` takes positional arguments, one written with ``:name``
    takes keywords (see :mod:`nproxyd.store.sql`); the wrong kind, a missing or an unknown
    parameter raises :class:`~nproxyd.store.sql.ParameterMismatch` before anything is sent.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self, name: str, /, *args: Any, **params: Any) -> list[asyncpg.Record]:
        with map_errors():
            return await self.pool.fetch(*bind(name, args, params))

    async def fetchrow(self, name: str, /, *args: Any, **params: Any) -> asyncpg.Record | None:
        with map_errors():
            return await self.pool.fetchrow(*bind(name, args, params))

    async def fetchval(self, name: str, /, *args: Any, **params: Any) -> Any:
        with map_errors():
            return await self.pool.fetchval(*bind(name, args, params))

    async def execute(self, name: str, /, *args: Any, **params: Any) -> str:
        with map_errors():
            return await self.pool.execute(*bind(name, args, params))

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

    async def fetch(self, name: str, /, *args: Any, **params: Any) -> list[asyncpg.Record]:
        return await self.connection.fetch(*bind(name, args, params))

    async def fetchval(self, name: str, /, *args: Any, **params: Any) -> Any:
        return await self.connection.fetchval(*bind(name, args, params))

    async def execute(self, name: str, /, *args: Any, **params: Any) -> str:
        return await self.connection.execute(*bind(name, args, params))


def affected(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 12``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class RolledBackDatabase(Database):
    """A :class:`Database` on one connection inside a transaction that is always rolled back.

    For ``nproxyd once --dry-run``: a tick runs exactly its real statements and sees its own
    writes, and :meth:`close` rolls every one of them back. Statements from concurrent tasks take
    turns on the connection; each runs in its own savepoint, so a failed statement does not
    abort the ones after it.
    """

    def __init__(self, pool: asyncpg.Pool, connection: Any, outer: Any) -> None:
        super().__init__(pool)
        self._connection = connection
        self._outer = outer
        self._turn = anyio.Lock()

    @classmethod
    async def open(cls, pool: asyncpg.Pool) -> RolledBackDatabase:
        with map_errors():
            connection = await pool.acquire()
            outer = connection.transaction()
            await outer.start()
        return cls(pool, connection, outer)

    async def _run(
        self, method: str, name: str, args: tuple[Any, ...], params: dict[str, Any]
    ) -> Any:
        bound = bind(name, args, params)
        async with self._turn:
            with map_errors():
                async with self._connection.transaction():
                    return await getattr(self._connection, method)(*bound)

    async def fetch(self, name: str, /, *args: Any, **params: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run("fetch", name, args, params)
        return rows

    async def fetchrow(self, name: str, /, *args: Any, **params: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._run("fetchrow", name, args, params)
        return row

    async def fetchval(self, name: str, /, *args: Any, **params: Any) -> Any:
        return await self._run("fetchval", name, args, params)

    async def execute(self, name: str, /, *args: Any, **params: Any) -> str:
        status: str = await self._run("execute", name, args, params)
        return status

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._turn:
            with map_errors():
                async with self._connection.transaction():
                    yield Transaction(self._connection)

    async def close(self) -> None:
        """Roll back everything, then close the pool (at once when the rollback failed)."""
        try:
            with map_errors():
                await self._outer.rollback()
                await self.pool.release(self._connection)
        except BaseException:
            self.pool.terminate()
            raise
        await super().close()
