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
    """EXPLAIN ANALYZE of one execution of a named statement, prepared under
    ``plan_cache_mode = mode``; rolled back.

    The statement is prepared (``PREPARE``) and executed with its values written as literals:
    a statement explained with bound parameters is planned for their values whatever the mode,
    so only the execution of a prepared statement shows the generic plan PostgreSQL caches.
    ``before`` runs first in the same transaction (e.g. to put rows in the state the statement
    expects without telling the statistics).
    """
    text, *values = bind(name, args, params)
    async with db.pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute(f"SET LOCAL plan_cache_mode = {mode}")
            if before is not None:
                await before(connection)
            await connection.execute(f"PREPARE {_EXPLAINED} AS {text}")
            try:
                literals = await _literals(connection, values)
                raw = await connection.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {_EXPLAINED}({', '.join(literals)})"
                )
            finally:
                await connection.execute(f"DEALLOCATE {_EXPLAINED}")
        finally:
            await transaction.rollback()
    return json.loads(raw) if isinstance(raw, str) else raw


_EXPLAINED = "nproxyd_explained"


async def _literals(connection: Held, values: list[Any]) -> list[str]:
    """``values`` as SQL literals of the types the prepared statement takes."""
    types = await connection.fetchval(
        "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = $1", _EXPLAINED
    )
    literals = []
    for type_name, value in zip(types, values, strict=True):
        quoted = await connection.fetchval(f"SELECT quote_nullable(($1::{type_name})::text)", value)
        literals.append(f"{quoted}::{type_name}")
    return literals


async def note_plan_modes(connection: asyncpg.Connection | asyncpg.Pool, *tables: str) -> None:
    """Note, for each row later inserted into ``tables``, the plan cache mode its AFTER ROW
    triggers run under (PostgreSQL's foreign-key checks are such triggers); read them back
    with :func:`noted_plan_modes`."""
    await connection.execute(
        """
        CREATE TABLE noted_plan_modes (table_name text, mode text);
        CREATE FUNCTION note_plan_mode() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO noted_plan_modes
            VALUES (TG_TABLE_NAME, current_setting('plan_cache_mode'));
            RETURN NULL;
        END $$;
        """
    )
    for table in tables:
        await connection.execute(
            f"CREATE TRIGGER note_plan_mode AFTER INSERT ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION note_plan_mode()"
        )


async def noted_plan_modes(connection: asyncpg.Connection | asyncpg.Pool) -> list[tuple[str, str]]:
    """(table, plan cache mode) of every row noted since :func:`note_plan_modes`, sorted."""
    rows = await connection.fetch("SELECT table_name, mode FROM noted_plan_modes")
    return sorted((row["table_name"], row["mode"]) for row in rows)
