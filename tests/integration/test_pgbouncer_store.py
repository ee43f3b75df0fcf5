"""The store through a real PgBouncer in transaction mode (``pooler = "pgbouncer"``).

Behind the pooler no session setting is sent (PgBouncer refuses ``plan_cache_mode``) and
statements are unnamed, which PostgreSQL plans with their values every time: the periodic
statements still read through their indexes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from nproxyd.store.database import Database, create_pool
from nproxyd.store.stores import OutboxStore
from tests.integration.test_query_plans import (  # noqa: F401 - idle_db is a fixture
    NOW,
    explain,
    idle_db,
    sequential_scans,
)
from tests.pg import database_name
from tests.pgbouncer import PgBouncer

pytestmark = pytest.mark.anyio

PERIODIC = [
    ("expiry_survey", (NOW, 4)),
    ("expire_pending_invoices", (NOW, "-infinity", "", 10_000)),
    ("claim_due_mail", (NOW, NOW, "x", 200)),
    ("outbox_counts", ()),
    ("recover_cooldown_keys", (NOW,)),
    ("claim_balance_due_keys", (NOW, 60.0, 1000)),
]


@pytest.fixture
async def pooled(dsn: str, pgbouncer: PgBouncer) -> AsyncIterator[Database]:
    """A pool on the test database through PgBouncer."""
    pool = await create_pool(
        pgbouncer.dsn(database_name(dsn)), max_size=8, timeout_seconds=5, pooler="pgbouncer"
    )
    database = Database(pool)
    yield database
    await database.close()


class TestThroughPgBouncer:
    async def test_many_concurrent_statements_share_few_server_connections(
        self, pooled: Database
    ) -> None:
        """200 statements from 8 pooled connections over PgBouncer's smaller server pool all
        succeed (no prepared statement lands on the wrong server connection)."""
        store = OutboxStore(pooled)
        results: list[int] = []

        async def worker() -> None:
            for _ in range(25):
                results.append((await store.counts()).pending)

        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(worker)
        assert results == [0] * 200

    @pytest.mark.usefixtures("idle_db")
    @pytest.mark.parametrize(("name", "args"), PERIODIC, ids=[name for name, _ in PERIODIC])
    async def test_periodic_statements_read_indexes_without_session_settings(
        self, pooled: Database, name: str, args: tuple[Any, ...]
    ) -> None:
        """Through PgBouncer (no plan_cache_mode, no statement cache) every idle-tick
        statement plans without a sequential scan of a big table."""
        plan = await explain(pooled, name, *args)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)
