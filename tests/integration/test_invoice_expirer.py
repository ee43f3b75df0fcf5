"""The invoice expirer against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import structlog

from nproxyd.actors.invoice_expirer import InvoiceExpirer
from nproxyd.store.database import Database
from nproxyd.store.stores import InvoiceStore
from tests import seed

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


async def statuses(db: Database) -> dict[str, tuple[str, datetime]]:
    rows = await db.pool.fetch("SELECT id, status, updated_at FROM payment_invoices")
    return {row["id"]: (row["status"], row["updated_at"]) for row in rows}


class TestInvoiceExpirer:
    async def test_due_pending_invoices_expire_and_others_are_untouched(self, db: Database) -> None:
        """Pending with expires_at <= now expire at now; NULL, future, paid, canceled stay."""
        user = await seed.user(db.pool, "u1")
        await seed.invoice(db.pool, "due", user_id=user, expires_at=NOW - timedelta(hours=1))
        await seed.invoice(db.pool, "exactly_now", user_id=user, expires_at=NOW)
        await seed.invoice(db.pool, "future", user_id=user, expires_at=NOW + timedelta(seconds=1))
        await seed.invoice(db.pool, "no_expiry", user_id=user, expires_at=None)
        await seed.invoice(
            db.pool, "paid", user_id=user, status="paid", expires_at=NOW - timedelta(days=1)
        )
        await seed.invoice(
            db.pool, "canceled", user_id=user, status="canceled", expires_at=NOW - timedelta(1)
        )
        expirer = InvoiceExpirer(InvoiceStore(db), interval_seconds=60, batch_size=100)

        report = await expirer.tick(NOW)

        after = await statuses(db)
        assert report.expired_count == 2
        assert after["due"] == ("expired", NOW)
        assert after["exactly_now"] == ("expired", NOW)
        assert {k: after[k][0] for k in ("future", "no_expiry", "paid", "canceled")} == {
            "future": "pending",
            "no_expiry": "pending",
            "paid": "paid",
            "canceled": "canceled",
        }

    async def test_many_rows_expire_in_bounded_batches(self, db: Database) -> None:
        """250 due rows with batch size 40 all expire, in ceil(250/40) full-or-last batches."""
        user = await seed.user(db.pool, "u1")
        await db.pool.execute(
            "INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
            " currency, amount_crypto, amount_usd, expires_at)"
            " SELECT 'i' || g, $1, 'np', 'p' || g, 'pending', 'USDT', 1, 1,"
            " $2::timestamptz - make_interval(secs => g % 7)"
            " FROM generate_series(1, 250) AS g",
            user,
            NOW,
        )
        expirer = InvoiceExpirer(InvoiceStore(db), interval_seconds=60, batch_size=40)

        report = await expirer.tick(NOW)

        assert report.expired_count == 250
        assert report.batches == 7
        pending = await db.pool.fetchval(
            "SELECT count(*) FROM payment_invoices WHERE status = 'pending'"
        )
        assert pending == 0

    async def test_a_locked_row_is_skipped_not_waited_for(self, db: Database) -> None:
        """A row locked by another transaction is left for a later tick; the rest expire."""
        user = await seed.user(db.pool, "u1")
        for name in ("a", "b", "c"):
            await seed.invoice(db.pool, name, user_id=user, expires_at=NOW - timedelta(hours=1))
        expirer = InvoiceExpirer(InvoiceStore(db), interval_seconds=60, batch_size=10)
        async with db.pool.acquire() as other, other.transaction():
            await other.execute("SELECT 1 FROM payment_invoices WHERE id = 'b' FOR UPDATE")
            report = await expirer.tick(NOW)
        assert report.expired_count == 2
        assert (await statuses(db))["b"][0] == "pending"
        assert (await expirer.tick(NOW)).expired_count == 1

    async def test_logs_the_expired_count(self, db: Database) -> None:
        """A tick that expired invoices logs pending_invoices_expired with expired_count."""
        user = await seed.user(db.pool, "u1")
        await seed.invoice(db.pool, "due", user_id=user, expires_at=NOW - timedelta(hours=1))
        with structlog.testing.capture_logs() as logs:
            await InvoiceExpirer(InvoiceStore(db), interval_seconds=60, batch_size=10).tick(NOW)
        assert {
            "event": "pending_invoices_expired",
            "expired_count": 1,
            "actor": "invoice-expirer",
            "log_level": "info",
        } in logs
