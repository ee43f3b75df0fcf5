"""A real PostgreSQL for tests: pgserver, unless NPROXYD_TEST_DSN points at a server.

The schema is migrated once into a template database; each test gets a fresh clone.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import asyncpg

from nproxyd.store.migrate import migrate

TEMPLATE = "nproxyd_test_template"
_counter = itertools.count()


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    if re.match(r"^postgres(ql)?://", dsn):
        return re.sub(r"^(postgres(?:ql)?://[^/?]*)/[^?]*", rf"\1/{name}", dsn, count=1)
    return f"{dsn} dbname={name}"


def database_name(dsn: str) -> str:
    """The database a URL or keyword DSN points at."""
    match = re.match(r"^postgres(?:ql)?://[^/?]*/([^?]*)", dsn)
    if match:
        return match.group(1)
    keyword = re.search(r"dbname=(\S+)", dsn)
    return keyword.group(1) if keyword else ""


class TestServer:
    """One PostgreSQL server for a test session, with a migrated template database."""

    __test__ = False

    def __init__(self) -> None:
        self.server: object | None = None
        self.admin_dsn = os.environ.get("NPROXYD_TEST_DSN", "")
        self.pgdata: Path | None = None

    def start(self) -> None:
        if not self.admin_dsn:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver  # noqa: PLC0415 - only without NPROXYD_TEST_DSN

                parent = Path(tempfile.mkdtemp(prefix="nproxyd-test-pg-"))
                # Registered before pgserver's own exit handler, so it runs after the server
                # was stopped and its data deleted: the empty parent does not pile up in /tmp.
                atexit.register(shutil.rmtree, parent, ignore_errors=True)
                self.pgdata = parent / "data"
                server = pgserver.get_server(  # type: ignore[attr-defined]
                    self.pgdata, cleanup_mode="delete"
                )
                self.server = server
                self.admin_dsn = server.get_uri()
        asyncio.run(self._make_template())

    async def _make_template(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await admin.close()
        connection = await asyncpg.connect(with_database(self.admin_dsn, TEMPLATE))
        try:
            await migrate(connection)
        finally:
            await connection.close()

    async def clone(self, prefix: str = "t") -> str:
        """Create a fresh database from the template; returns its DSN."""
        name = f"nproxyd_{prefix}_{os.getpid()}_{next(_counter)}"
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        finally:
            await admin.close()
        return with_database(self.admin_dsn, name)

    async def drop(self, dsn: str) -> None:
        name = database_name(dsn)
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()
