"""The embedded PostgreSQL used when ``database.dsn`` is empty (a pgserver instance).

pgserver keeps one server per data directory and counts the processes using it, so a second
nproxyd process with the same state directory reuses the running server, and the last one to
exit stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import warnings
from pathlib import Path

import anyio
import asyncpg
import structlog

from nproxyd.core.errors import DatabaseUnavailable
from nproxyd.store.database import map_errors

DATABASE_NAME = "nproxyd"
# pgserver's list of the processes using the server; the last one to exit stops it.
HANDLE_PIDS = ".handle_pids.json"


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop processes that no longer exist from pgserver's handle list; returns the dropped.

    A process killed without running its exit handlers (``kill -9``) stays in the list, and
    then no later process is ever the last one, so the server would never be stopped again.
    Called under the state directory's lock, before this process adds itself.
    """
    path = pgdata / HANDLE_PIDS
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(pids, list):
        return []
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    dropped = [pid for pid in pids if pid not in alive]
    if dropped:
        path.write_text(json.dumps(alive))
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start(pgdata: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        import pgserver  # noqa: PLC0415 - heavy import, only when embedded

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        dropped = forget_dead_handles(pgdata)
        if dropped:
            structlog.get_logger().info("embedded_postgres_dead_handles_dropped", pids=dropped)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        uri: str = server.get_uri()
    return uri


def _lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def _unlock(descriptor: int) -> None:
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


async def start_embedded(state_dir: Path) -> str:
    """Start (or reuse) the embedded server; returns a DSN of its ``nproxyd`` database.

    Processes sharing a state directory serialise on a lock file while one of them starts the
    server and creates the database.
    """
    descriptor = await anyio.to_thread.run_sync(_lock, state_dir / "postgres.lock")
    try:
        try:
            admin_uri = await anyio.to_thread.run_sync(_start, state_dir / "postgres")
        except Exception as exc:
            raise DatabaseUnavailable(f"embedded PostgreSQL failed to start: {exc}") from exc
        await _ensure_database(admin_uri)
    finally:
        _unlock(descriptor)
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
