"""The embedded PostgreSQL used when ``database.dsn`` is empty (a pgserver instance).

pgserver keeps one server per data directory and counts the processes using it, so a second
nproxyd process with the same state directory reuses the running server, and the last one to
exit stops it. Starting the server's process is :mod:`nproxyd.store.embedded_process`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
import asyncpg
import structlog

from nproxyd.core.errors import DatabaseUnavailable
from nproxyd.store.database import map_errors
from nproxyd.store.embedded_process import (
    StartFailed,
    release_held_logs,
    start,
    take_early,
    unlock,
)

DATABASE_NAME = "nproxyd"


async def start_embedded(state_dir: Path) -> str:
    """Start (or reuse) the embedded server; returns a DSN of its ``nproxyd`` database.

    Processes sharing a state directory serialise on a lock file while one of them starts the
    server and creates the database.
    """
    early = take_early(state_dir)
    try:
        if early is None:
            started = await anyio.to_thread.run_sync(start, state_dir)
        else:
            try:
                started = await anyio.to_thread.run_sync(early.result)
            finally:
                release_held_logs()
    except StartFailed as exc:
        raise DatabaseUnavailable(f"embedded PostgreSQL failed to start: {exc}") from exc.__cause__
    admin_uri = started.admin_uri
    try:
        if started.dropped_handles:
            structlog.get_logger().info(
                "embedded_postgres_dead_handles_dropped", pids=started.dropped_handles
            )
        await _ensure_database(admin_uri)
    finally:
        unlock(started.lock)
    return admin_uri.replace("/postgres?", f"/{DATABASE_NAME}?", 1)


async def _ensure_database(admin_uri: str) -> None:
    with map_errors():
        connection = await asyncpg.connect(admin_uri)
        try:
            exists = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME
            )
            if not exists:
                # another process may create it first
                with contextlib.suppress(
                    asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError
                ):
                    await connection.execute(f"CREATE DATABASE {DATABASE_NAME}")
        finally:
            await connection.close()
