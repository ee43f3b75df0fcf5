"""The payment watcher's periodic statements read through indexes when nothing is due.

With 20,000 invoices that are paid and followed to the end, EXPLAIN must show no sequential
scan on ``payment_invoices`` or nproxyd's payment table: a tick costs what is due, not what
the tables hold.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from nproxyd.core.payments import CheckResult, ProviderPayment, RecordContext
from nproxyd.store.database import Database
from nproxyd.store.payments import PaymentStore
from tests.conftest import open_database
from tests.integration.test_query_plans import NOW, ROWS, explain
from tests.plans import note_plan_modes, noted_plan_modes

pytestmark = pytest.mark.anyio

WATCHED_TABLES = {"payment_invoices", "nproxyd_invoice_payments"}


def sequential_scans(plan: Any) -> list[str]:
    found = []
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in WATCHED_TABLES:
            found.append(node["Relation Name"])
        stack.extend(node.get("Plans", []))
    return found


@pytest.fixture
async def settled_db(db: Database) -> Database:
    """20,000 paid invoices of the provider, each followed until `finished` and activated."""
    pool = db.pool
    await pool.execute("INSERT INTO users (id, email) VALUES ('u', 'u@example.com')")
    await pool.execute(
        "INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
        " currency, amount_crypto, amount_usd, updated_at)"
        " SELECT 'i' || g, 'u', 'nowpayments', 'p' || g, 'paid', 'USDT', 1, 1,"
        " $1::timestamptz - interval '1 day' FROM generate_series(1, $2::int) AS g",
        NOW,
        ROWS,
    )
    await pool.execute(
        "INSERT INTO nproxyd_invoice_payments (invoice_id, provider, provider_payment_id,"
        " provider_status, status_since, next_check_at)"
        " SELECT id, provider, provider_invoice_id, 'finished', $1::timestamptz, NULL"
        " FROM payment_invoices",
        NOW,
    )
    await pool.execute("ANALYZE")
    return db


class TestIdlePaymentPlans:
    @pytest.mark.parametrize(
        ("name", "args"),
        [
            ("discover_payment_invoices", ("nowpayments", NOW, 72 * 3600.0)),
            ("claim_due_payment_checks", (NOW, NOW, 200, 72 * 3600.0)),
            ("settle_awaiting_payments", (NOW,)),
            ("awaiting_payment_summary", (NOW,)),
            ("list_awaiting_payments", ()),
            ("track_notified_payment", ("nowpayments", "p42", NOW)),
        ],
    )
    async def test_statement_reads_through_an_index(
        self, settled_db: Database, name: str, args: tuple[Any, ...]
    ) -> None:
        """Each statement a tick, a scrape or an IPN runs avoids scanning the big tables."""
        plan = await explain(settled_db, name, *args)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)


async def seed_pending(db: Database, count: int) -> None:
    """``count`` pending invoices of the provider, ids ``i1``... and payment ids ``p1``..."""
    await db.pool.execute("INSERT INTO users (id, email) VALUES ('u', 'u@example.com')")
    await db.pool.execute(
        "INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
        " currency, amount_crypto, amount_usd)"
        " SELECT 'i' || g, 'u', 'nowpayments', 'p' || g, 'pending', 'USDT', 1, 1"
        " FROM generate_series(1, $1::int) AS g",
        count,
    )


class TestForeignKeyChecks:
    async def test_discovered_invoices_are_checked_with_cached_plans(self, dsn: str) -> None:
        """The rows discovery writes are checked (their foreign key, like every AFTER ROW
        trigger) under plan_cache_mode auto, so a first tick following thousands of invoices
        does not plan one check per row; the connection keeps force_custom_plan."""
        db = await open_database(dsn, 1)  # one connection: the next statement runs on it
        try:
            await seed_pending(db, 3)
            await note_plan_modes(db.pool, "nproxyd_invoice_payments")
            followed = await PaymentStore(db).discover("nowpayments", NOW, grace_hours=72)
            noted = await noted_plan_modes(db.pool)
            session_mode = await db.pool.fetchval("SHOW plan_cache_mode")
        finally:
            await db.close()

        assert followed == 3
        assert noted == [("nproxyd_invoice_payments", "auto")] * 3
        assert session_mode == "force_custom_plan"

    async def test_recorded_status_changes_are_checked_with_cached_plans(self, dsn: str) -> None:
        """The history rows a batch of results writes are checked under plan_cache_mode auto
        too; the connection keeps force_custom_plan."""
        db = await open_database(dsn, 1)  # one connection: the next statement runs on it
        try:
            await seed_pending(db, 3)
            store = PaymentStore(db)
            await store.discover("nowpayments", NOW, grace_hours=72)
            await note_plan_modes(db.pool, "nproxyd_invoice_payment_history")
            results = [
                CheckResult(
                    invoice_id=f"i{number}",
                    outcome="ok",
                    payment=ProviderPayment(payment_id=f"p{number}", status="confirming"),
                )
                for number in (1, 2, 3)
            ]
            changes = await store.record(results, RecordContext(now=NOW, source="poll"))
            noted = await noted_plan_modes(db.pool)
            session_mode = await db.pool.fetchval("SHOW plan_cache_mode")
        finally:
            await db.close()

        assert len(changes) == 3
        assert noted == [("nproxyd_invoice_payment_history", "auto")] * 3
        assert session_mode == "force_custom_plan"
