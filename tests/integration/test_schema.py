"""The schema of docs/design.md §4 and its migrations, on a real PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from nproxyd.store.database import Database
from nproxyd.store.migrate import _LOCK_KEY as LOCK_KEY
from nproxyd.store.migrate import available, migrate

pytestmark = pytest.mark.anyio


class TestBaseColumns:
    async def test_rows_with_only_shared_columns_are_valid(self, db: Database) -> None:
        """Rows inserted by another writer with only the contract's columns are accepted."""
        pool = db.pool
        await pool.execute("INSERT INTO users (id, email) VALUES ('u1', 'u1@example.com')")
        await pool.execute(
            "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
            " monthly_price_usd, billing_currency) VALUES ('p1', 'm', 'M', 1, 29, 'USDT')"
        )
        await pool.execute(
            "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually)"
            " VALUES ('s1', 'u1', 'p1', 'active', true)"
        )
        await pool.execute(
            "INSERT INTO payment_invoices (user_id, provider, provider_invoice_id, status,"
            " currency, amount_crypto, amount_usd) VALUES ('u1', 'np', 'x', 'pending', 'USDT',"
            " 29, 29)"
        )
        await pool.execute(
            "INSERT INTO provider_keys (id, provider, label, status, consecutive_failures)"
            " VALUES ('k1', 'p', 'l', 'active', 0)"
        )
        await pool.execute(
            "INSERT INTO mail_outbox (id, status, to_address, subject, body, message_id,"
            " attempts, next_attempt_at) VALUES ('m1', 'pending', 'a@b.c', 's', 'b', '<x@y>',"
            " 0, now())"
        )
        row = await pool.fetchrow("SELECT leased_by, lease_until FROM mail_outbox")
        assert row is not None
        assert (row["leased_by"], row["lease_until"]) == ("", None)
        invoice_id = await pool.fetchval("SELECT id FROM payment_invoices")
        assert isinstance(invoice_id, str) and len(invoice_id) == 36

    async def test_status_values_outside_the_set_are_refused(self, db: Database) -> None:
        """CHECK constraints hold the status value sets."""
        await db.pool.execute("INSERT INTO users (id, email) VALUES ('u1', 'u1@example.com')")
        with pytest.raises(asyncpg.CheckViolationError):
            await db.pool.execute(
                "INSERT INTO payment_invoices (user_id, provider, provider_invoice_id, status,"
                " currency, amount_crypto, amount_usd) VALUES ('u1', 'np', 'x', 'unpaid',"
                " 'USDT', 29, 29)"
            )

    async def test_mail_without_message_id_gets_a_unique_one(self, db: Database) -> None:
        """Mail inserted without a Message-ID gets a distinct one from the column default."""
        for n in range(2):
            await db.pool.execute(
                "INSERT INTO mail_outbox (to_address, subject, body) VALUES ($1, 's', 'b')",
                f"a{n}@example.com",
            )
        ids = await db.pool.fetch("SELECT message_id FROM mail_outbox")
        assert len({row["message_id"] for row in ids}) == 2


class TestMigrations:
    async def test_rerun_applies_nothing(self, db: Database) -> None:
        """Migrating an up-to-date database applies no version."""
        async with db.pool.acquire() as connection:
            assert await migrate(connection) == []
        versions = await db.pool.fetch("SELECT version FROM nproxyd_schema_migrations")
        assert sorted(row["version"] for row in versions) == [m.version for m in available()]

    async def test_existing_shared_tables_are_kept(self, db: Database) -> None:
        """Migrating a database where the web API made the tables keeps their rows."""
        await db.pool.execute("INSERT INTO users (id, email) VALUES ('u1', 'u1@example.com')")
        await db.pool.execute("DELETE FROM nproxyd_schema_migrations")
        async with db.pool.acquire() as connection:
            applied = await migrate(connection)
        assert applied == [m.version for m in available()]
        assert await db.pool.fetchval("SELECT count(*) FROM users") == 1

    async def test_an_up_to_date_database_is_checked_without_the_lock(
        self, db: Database, dsn: str
    ) -> None:
        """With every migration recorded, a start's check returns at once even while another
        session holds the migration lock (a start reads; only a migrating one waits)."""
        holder = await asyncpg.connect(dsn)

        async def must_not_wait(_: float) -> None:
            raise AssertionError("waited for the migration lock")

        try:
            await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            async with db.pool.acquire() as connection:
                assert await migrate(connection, sleep=must_not_wait) == []
        finally:
            await holder.close()
