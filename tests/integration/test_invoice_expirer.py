"""The invoice expirer against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import structlog

from nproxyd.actors.invoice_expirer import ExpirerPorts, ExpirerSettings, InvoiceExpirer
from nproxyd.core.clock import SystemClock
from nproxyd.core.ports import ExpiryStore
from nproxyd.store.database import Database
from nproxyd.store.sql import QUERIES
from nproxyd.store.stores import InvoiceStore
from tests import seed

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


async def statuses(db: Database) -> dict[str, tuple[str, datetime]]:
    rows = await db.pool.fetch("SELECT id, status, updated_at FROM payment_invoices")
    return {row["id"]: (row["status"], row["updated_at"]) for row in rows}


def expirer_for(store: ExpiryStore, batch_size: int) -> InvoiceExpirer:
    settings = ExpirerSettings(interval_seconds=60, batch_size=batch_size)
    return InvoiceExpirer(settings, ExpirerPorts(store=store), SystemClock())


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
        expirer = expirer_for(InvoiceStore(db), 100)

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
        """250 due rows with batch size 40 all expire, in more than one statement."""
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
        expirer = expirer_for(InvoiceStore(db), 40)

        report = await expirer.tick(NOW)

        assert report.expired_count == 250
        assert report.batches > 1
        pending = await db.pool.fetchval(
            "SELECT count(*) FROM payment_invoices WHERE status = 'pending'"
        )
        assert pending == 0

    async def test_a_locked_row_is_skipped_not_waited_for(self, db: Database) -> None:
        """A row locked by another transaction is left for a later tick; the rest expire."""
        user = await seed.user(db.pool, "u1")
        for name in ("a", "b", "c"):
            await seed.invoice(db.pool, name, user_id=user, expires_at=NOW - timedelta(hours=1))
        expirer = expirer_for(InvoiceStore(db), 10)
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
            await expirer_for(InvoiceStore(db), 10).tick(NOW)
        assert {
            "event": "pending_invoices_expired",
            "expired_count": 1,
            "actor": "invoice-expirer",
            "log_level": "info",
        } in logs


async def many_due(db: Database, user: str, count: int, *, due_every: int = 1) -> None:
    """``count`` pending invoices; every ``due_every``-th is due at NOW, the rest tomorrow."""
    await db.pool.execute(
        "INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
        " currency, amount_crypto, amount_usd, expires_at)"
        " SELECT 'i' || g, $1, 'np', 'p' || g, 'pending', 'USDT', 1, 1,"
        " CASE WHEN g % $3::int = 0 THEN $2::timestamptz - interval '1 hour'"
        "      ELSE $2::timestamptz + interval '1 day' END"
        " FROM generate_series(1, $4::int) AS g",
        user,
        NOW,
        due_every,
        count,
    )
    await db.pool.execute("ANALYZE payment_invoices")


async def expired_count(db: Database) -> int:
    count: int = await db.pool.fetchval(
        "SELECT count(*) FROM payment_invoices WHERE status = 'expired'"
    )
    return count


async def expire_all(store: InvoiceStore) -> None:
    async for _ in store.expire_due(NOW, 100):
        pass


class TestPhysicalOrder:
    async def test_a_table_mostly_due_is_swept_by_page_ranges(self, db: Database) -> None:
        """With many due rows per page every due row expires, not-due rows stay, in sweeps."""
        user = await seed.user(db.pool, "u1")
        await many_due(db, user, 3000, due_every=2)
        store = InvoiceStore(db)
        survey_pages = await db.pool.fetchval(
            "SELECT pg_relation_size('payment_invoices') / current_setting('block_size')::int"
        )

        report = await expirer_for(store, 100).tick(NOW)

        rows = await db.pool.fetch(
            "SELECT status, count(*) AS n FROM payment_invoices GROUP BY status ORDER BY status"
        )
        counts = {row["status"]: row["n"] for row in rows}
        assert counts == {"expired": 1500, "pending": 1500}
        assert report.expired_count == 1500
        # Page ranges plus one final index batch: more statements than rows / batch size.
        assert report.batches >= 1500 // 100 and survey_pages > 1

    async def test_a_sweep_statement_reads_pages_in_physical_order(self, db: Database) -> None:
        """With most rows due, a sweep statement is a TID range scan over its pages."""
        user = await seed.user(db.pool, "u1")
        await many_due(db, user, 3000, due_every=2)
        plan = await db.pool.fetchval(
            "EXPLAIN (FORMAT JSON) " + QUERIES["expire_pending_invoices_in_pages"],
            NOW,
            (0, 0),
            (10, 0),
            1000,
        )
        assert "Tid Range Scan" in str(plan), plan

    async def test_a_sweep_statement_is_bounded(self, db: Database) -> None:
        """A sweep statement expires at most batch_size rows, or one heap page's rows."""
        user = await seed.user(db.pool, "u1")
        await many_due(db, user, 5000)
        page_rows = await db.pool.fetchval(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM payment_invoices"
            " GROUP BY (ctid::text::point)[0]) AS pages"
        )
        counts = [count async for count in InvoiceStore(db).expire_due(NOW, 200)]
        assert sum(counts) == 5000
        assert len(counts) > 5000 // max(200, page_rows)
        assert max(counts) <= max(200, page_rows)

    async def test_a_sweep_expires_two_page_ranges_at_once(self, db: Database) -> None:
        """While the first page range waits for a row locked by another transaction, the range
        next to it is expired: the sweep runs two ranges at once, on two connections."""
        user = await seed.user(db.pool, "u1")
        await many_due(db, user, 3000)
        store = InvoiceStore(db)
        store.RANGE_LOCK_TIMEOUT = "30s"  # the first range waits as long as the lock is held
        async with db.pool.acquire() as locker, anyio.create_task_group() as sweep:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("SELECT 1 FROM payment_invoices WHERE ctid = '(0,1)' FOR UPDATE")
            sweep.start_soon(expire_all, store)
            with anyio.fail_after(10):  # a sweep one range at a time waits 30 s here
                while not (expired_while_locked := await expired_count(db)):
                    await anyio.sleep(0.01)
            await transaction.rollback()
        assert expired_while_locked > 0
        assert await expired_count(db) == 3000

    async def test_a_sweep_skips_locked_rows_and_a_later_tick_takes_them(
        self, db: Database
    ) -> None:
        """A locked due row is not waited for by a sweep; the next tick expires it."""
        user = await seed.user(db.pool, "u1")
        await many_due(db, user, 500)
        expirer = expirer_for(InvoiceStore(db), 50)
        async with db.pool.acquire() as other, other.transaction():
            await other.execute("SELECT 1 FROM payment_invoices WHERE id = 'i7' FOR UPDATE")
            report = await expirer.tick(NOW)
        assert report.expired_count == 499
        assert (await expirer.tick(NOW)).expired_count == 1

    @pytest.mark.parametrize("when", ["-infinity", "0001-01-01 00:00:00+00 BC"])
    async def test_expiry_times_python_cannot_represent_expire_too(
        self, db: Database, when: str
    ) -> None:
        """An expires_at of -infinity or BC expires like any past time, by either path."""
        user = await seed.user(db.pool, "u1")
        await seed.invoice(db.pool, "ok", user_id=user, expires_at=NOW - timedelta(hours=1))
        await seed.invoice(db.pool, "odd", user_id=user, expires_at=None)
        await db.pool.execute(
            "UPDATE payment_invoices SET expires_at = $1::text::timestamptz WHERE id = 'odd'", when
        )
        for batch_size in (1, 100):  # keyset cursor over the odd row, then a single batch
            await db.pool.execute(
                "UPDATE payment_invoices SET status = 'pending' WHERE id IN ('ok', 'odd')"
            )
            report = await expirer_for(InvoiceStore(db), batch_size).tick(NOW)
            assert report.expired_count == 2


class TestSweepWithConcurrentWriters:
    async def test_a_row_another_writer_moves_off_the_unswept_pages_expires_in_the_same_tick(
        self, db: Database
    ) -> None:
        """A due row updated mid-sweep, its new version off the pages still to sweep, expires."""
        user = await seed.user(db.pool, "u1")
        await many_due(db, user, 3000)
        pages = await db.pool.fetchval(
            "SELECT pg_relation_size('payment_invoices') / current_setting('block_size')::int"
        )
        expired, swept_before = 0, 0
        moved: list[Any] = []
        async for count in InvoiceStore(db).expire_due(NOW, 100):
            expired += count
            if not moved:  # after the first page range: another writer updates later rows
                swept_before = await db.pool.fetchval(
                    "SELECT min((ctid::text::point)[0])::int FROM payment_invoices"
                    " WHERE status = 'pending'"
                )
                moved = await db.pool.fetch(
                    "UPDATE payment_invoices SET updated_at = $1 WHERE id IN"
                    " (SELECT id FROM payment_invoices WHERE status = 'pending'"
                    "  AND (ctid::text::point)[0] BETWEEN $2::int / 2 AND $2::int - 2)"
                    " RETURNING id, (ctid::text::point)[0]::int AS page",
                    NOW,
                    pages,
                )
                assert pages > 6 and 0 < swept_before < pages // 2, (pages, swept_before)
        left = await db.pool.fetchval(
            "SELECT count(*) FROM payment_invoices WHERE status = 'pending' AND expires_at <= $1",
            NOW,
        )
        # The scenario happened: some new versions landed where no later page range reads.
        assert any(row["page"] >= pages or row["page"] < swept_before for row in moved), moved
        assert left == 0
        assert expired == 3000
