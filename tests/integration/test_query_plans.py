"""The periodic statements of an idle daemon read through indexes (no sequential scans).

With 20,000 invoices, mail rows and keys of which none is due, EXPLAIN must show no
``Seq Scan`` on the big tables for the statements every tick runs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from nproxyd.store.database import Database
from nproxyd.store.sql import bind

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ROWS = 20_000
BIG_TABLES = {"payment_invoices", "mail_outbox", "provider_keys", "subscriptions"}


def sequential_scans(plan: Any) -> list[str]:
    found = []
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in BIG_TABLES:
            found.append(node["Relation Name"])
        stack.extend(node.get("Plans", []))
    return found


async def explain(db: Database, name: str, *args: Any, **params: Any) -> Any:
    text, *values = bind(name, args, params)
    raw = await db.pool.fetchval("EXPLAIN (FORMAT JSON) " + text, *values)
    return json.loads(raw) if isinstance(raw, str) else raw


@pytest.fixture
async def idle_db(db: Database) -> Database:
    """20,000 paid invoices, sent mails and active keys checked just now."""
    pool = db.pool
    await pool.execute("INSERT INTO users (id, email) VALUES ('u', 'u@example.com')")
    await pool.execute(
        "INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
        " currency, amount_crypto, amount_usd, expires_at)"
        " SELECT 'i' || g, 'u', 'np', 'p' || g, 'paid', 'USDT', 1, 1,"
        " $1::timestamptz - interval '1 day' FROM generate_series(1, $2::int) AS g",
        NOW,
        ROWS,
    )
    await pool.execute(
        "INSERT INTO mail_outbox (id, status, to_address, subject, body, sent_at)"
        " SELECT 'm' || g, 'sent', 'a@example.com', 's', 'b', now()"
        " FROM generate_series(1, $1::int) AS g",
        ROWS,
    )
    await pool.execute(
        "INSERT INTO provider_keys (id, provider, label, status, balance_checked_at)"
        " SELECT 'k' || g, 'p', 'l', CASE WHEN g % 2 = 0 THEN 'disabled' ELSE 'active' END, $1"
        " FROM generate_series(1, $2::int) AS g",
        NOW,
        ROWS,
    )
    await pool.execute("ANALYZE")
    return db


class TestIdlePlans:
    async def test_expiry_batch_uses_the_pending_index(self, idle_db: Database) -> None:
        """Expiring reads only the partial index of pending invoices."""
        plan = await explain(idle_db, "expire_pending_invoices", NOW, "-infinity", "", 10_000)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_expiry_survey_uses_the_pending_index(self, idle_db: Database) -> None:
        """The idle tick's survey counts due invoices through the partial index only."""
        plan = await explain(idle_db, "expiry_survey", NOW, 4)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_page_sweep_never_scans_the_table(self, idle_db: Database) -> None:
        """A sweep statement reads its page range or the index, never the whole table."""
        plan = await explain(idle_db, "expire_pending_invoices_in_pages", NOW, (0, 0), (8, 0), 500)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_mail_claim_uses_the_due_index(self, idle_db: Database) -> None:
        """Claiming due mail reads only the partial index of pending rows."""
        plan = await explain(idle_db, "claim_due_mail", NOW, NOW, "x", 200)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_outbox_counts_use_partial_indexes(self, idle_db: Database) -> None:
        """Counting pending and dead mail never scans the whole outbox."""
        plan = await explain(idle_db, "outbox_counts")
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_key_recovery_uses_the_cooldown_index(self, idle_db: Database) -> None:
        """Recovering cooled-down keys reads only the partial index of cooldown keys."""
        plan = await explain(idle_db, "recover_cooldown_keys", NOW)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_balance_claim_uses_the_active_index(self, idle_db: Database) -> None:
        """Finding keys due for a balance check reads only the index of active keys."""
        plan = await explain(idle_db, "claim_balance_due_keys", NOW, 60.0, 1000)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_health_gauges_use_partial_indexes(self, idle_db: Database) -> None:
        """The gauges read at every scrape and health check never scan the whole outbox."""
        plan = await explain(idle_db, "health_gauges", NOW)
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)

    async def test_latest_failures_never_scan_the_whole_outbox(self, idle_db: Database) -> None:
        """The newest stored errors for /status are found without scanning sent mail."""
        plan = await explain(idle_db, "latest_failures")
        assert sequential_scans(plan) == [], json.dumps(plan, indent=1)
