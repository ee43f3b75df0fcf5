"""The embedded server's ``nproxyd`` database: created once, then known without asking.

A real pgserver cluster in a temporary state directory (initdb included, so these tests take
a few seconds); the server stops when the test process exits (pgserver's ``cleanup_mode``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from nproxyd.core.errors import NproxydError
from nproxyd.store.embedded import DATABASE_MARKER, database_known, start_embedded

pytestmark = pytest.mark.anyio


async def _execute(dsn: str, database: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn.replace("/nproxyd?", f"/{database}?", 1))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _oid(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        oid: int = await connection.fetchval(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        )
    finally:
        await connection.close()
    return oid


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def started(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Path, str]]:
    """A state directory whose embedded server was started once, and its DSN."""
    state_dir = tmp_path_factory.mktemp("embedded")
    dsn = await start_embedded(state_dir)
    yield state_dir, dsn
    await _execute(dsn, "template1", "ALTER DATABASE postgres ALLOW_CONNECTIONS true")


class TestDatabaseMarker:
    async def test_the_first_start_records_the_database_it_created(
        self, started: tuple[Path, str]
    ) -> None:
        """After the first start the marker names the ``nproxyd`` database's own oid."""
        state_dir, dsn = started
        name, oid = (state_dir / DATABASE_MARKER).read_text().split()
        assert (name, int(oid)) == ("nproxyd", await _oid(dsn))
        assert database_known(state_dir)

    async def test_a_known_database_needs_no_admin_connection(
        self, started: tuple[Path, str]
    ) -> None:
        """With the marker valid, a start succeeds even when the admin database refuses
        connections: it is not asked whether ``nproxyd`` exists."""
        state_dir, dsn = started
        await _execute(dsn, "template1", "ALTER DATABASE postgres ALLOW_CONNECTIONS false")
        try:
            assert await start_embedded(state_dir) == dsn
        finally:
            await _execute(dsn, "template1", "ALTER DATABASE postgres ALLOW_CONNECTIONS true")

    async def test_a_dropped_database_is_created_again(self, started: tuple[Path, str]) -> None:
        """When the marked database is gone (its directory with it), the next start creates
        it again and records the new one."""
        state_dir, dsn = started
        old_oid = await _oid(dsn)
        await _execute(dsn, "template1", "DROP DATABASE nproxyd WITH (FORCE)")
        assert not database_known(state_dir)
        assert await start_embedded(state_dir) == dsn
        new_oid = await _oid(dsn)
        assert new_oid != old_oid
        assert (state_dir / DATABASE_MARKER).read_text().split() == ["nproxyd", str(new_oid)]

    async def test_an_unknown_database_is_checked_through_the_admin_database(
        self, started: tuple[Path, str]
    ) -> None:
        """Without a marker the start asks the admin database (which here refuses, so the
        start fails): the marker alone is what lets a start skip that connection."""
        state_dir, dsn = started
        (state_dir / DATABASE_MARKER).unlink()
        await _execute(dsn, "template1", "ALTER DATABASE postgres ALLOW_CONNECTIONS false")
        try:
            with pytest.raises(NproxydError):
                await start_embedded(state_dir)
        finally:
            await _execute(dsn, "template1", "ALTER DATABASE postgres ALLOW_CONNECTIONS true")
        assert await start_embedded(state_dir) == dsn
        assert database_known(state_dir)
