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
    DATA_DIRECTORY,
    StartFailed,
    release_held_logs,
    start,
    take_early,
    unlock,
)

DATABASE_NAME = "nproxyd"
# "<name> <oid>" of the database once it was seen to exist: a later start whose data
# directory still holds that oid's directory skips the admin connection that checks it
# (docs/benchmarks.md "Start-up"). Written and read under the state directory's lock.
DATABASE_MARKER = "postgres.database"


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
        if not database_known(state_dir):
            oid = await _ensure_database(admin_uri)
            _write_marker(state_dir, oid)
    finally:
        unlock(started.lock)
    return admin_uri.replace("/postgres?", f"/{DATABASE_NAME}?", 1)


def database_known(state_dir: Path) -> bool:
    """Whether the marker names the database and its directory is still in the cluster."""
    try:
        name, oid = (state_dir / DATABASE_MARKER).read_text(encoding="ascii").split()
    except (OSError, ValueError):
        return False
    return (
        name == DATABASE_NAME
        and oid.isdigit()
        and (state_dir / DATA_DIRECTORY / "base" / oid).is_dir()
    )


def _write_marker(state_dir: Path, oid: int) -> None:
    marker = state_dir / DATABASE_MARKER
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(f"{DATABASE_NAME} {oid}\n", encoding="ascii")
    temporary.replace(marker)


async def _ensure_database(admin_uri: str) -> int:
    """Create the database unless it exists; its oid."""
    query = "SELECT oid FROM pg_database WHERE datname = $1"
    with map_errors():
        connection = await asyncpg.connect(admin_uri)
        try:
            oid: int | None = await connection.fetchval(query, DATABASE_NAME)
            if oid is None:
                # another process may create it first
                with contextlib.suppress(
                    asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError
                ):
                    await connection.execute(f"CREATE DATABASE {DATABASE_NAME}")
                oid = await connection.fetchval(query, DATABASE_NAME)
        finally:
            await connection.close()
    return int(oid)
