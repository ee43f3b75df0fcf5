"""EXPLAIN ANALYZE of named statements for the query-plan tests."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from nproxyd.store.database import Database
from nproxyd.store.sql import bind

# Each statement is checked with the plans PostgreSQL picks by itself (custom plans for the
# first executions of a prepared statement) and with the generic plan it may cache later.
PLAN_MODES = ("auto", "force_generic_plan")
# A pool's connection, as the statements get one.
Held: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
Prepare = Callable[[Held], Awaitable[object]]


def nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every node of an ``EXPLAIN (FORMAT JSON)`` plan, the root first."""
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", []))


def reads(plan: Any, table: str) -> list[tuple[str, str, str, int]]:
    """(alias, node type, index, times executed) of every read of ``table``."""
    return [
        (node["Alias"], node["Node Type"], node.get("Index Name", ""), node["Actual Loops"])
        for node in nodes(plan)
        if node.get("Relation Name") == table and node["Node Type"] != "ModifyTable"
    ]


async def explain_analyze(
    db: Database,
    name: str,
    mode: str,
    *args: Any,
    before: Prepare | None = None,
    **params: Any,
) -> Any:
    """EXPLAIN ANALYZE of a named statement under ``plan_cache_mode = mode``, rolled back.

    ``before`` runs first in the same transaction (e.g. to put rows in the state the statement
    expects without telling the statistics).
    """
    async with db.pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute(f"SET LOCAL plan_cache_mode = {mode}")
            if before is not None:
                await before(connection)
            text, *values = bind(name, args, params)
            raw = await connection.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + text, *values)
        finally:
            await transaction.rollback()
    return json.loads(raw) if isinstance(raw, str) else raw
