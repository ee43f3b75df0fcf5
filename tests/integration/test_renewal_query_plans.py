"""The renewal scheduler's batch statements keep their plans at batch 1000, tiny or 1M claims.

``claim_renewal_slots`` inserts a batch of slots, ``commit_renewal_invoices`` and
``release_renewal_claims`` join their ``unnest`` of slots to ``nproxyd_renewal_claims``, which
keeps one row per (subscription, cycle) forever. Whatever its size, the batch must reach the
claims through their primary key, one probe per slot: never a scan of the table, and never a
partial index of every claimed row (whose size is the claims in flight on all instances, not the
batch). The commit's check for an invoice made meanwhile probes ``payment_invoices`` by its
(subscription, created) index. Each plan is checked with custom and generic plans, the
statements executed for real (EXPLAIN ANALYZE inside a transaction rolled back).
"""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from nproxyd.core.records import StoredInvoice
from nproxyd.core.rules import RENEWAL_SUBJECT, order_id
from nproxyd.store.database import Database
from nproxyd.store.stores import RenewalStore
from tests.conftest import open_database
from tests.plans import (
    PLAN_MODES,
    explain_analyze,
    nodes,
    note_plan_modes,
    noted_plan_modes,
    reads,
)
from tests.renewal_checks import NOW as RENEWAL_NOW
from tests.renewal_checks import PERIOD_START, seed_due
from tests.seed import plan as seed_plan

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
CYCLE = NOW - timedelta(days=27)
BATCH = 1000
TOKEN = "t" * 32
CLAIMS = "nproxyd_renewal_claims"
CLAIMS_KEY = "nproxyd_renewal_claims_pkey"
BY_SUBSCRIPTION = "nproxyd_payment_invoices_subscription_created"
USERS = """
INSERT INTO users (id, email) SELECT 'u' || g, 'u' || g || '@example.com'
FROM generate_series(1, $1::int) AS g
"""
SUBSCRIPTIONS = """
INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually, activated_at,
    current_period_start, current_period_end, created_at, updated_at)
SELECT 's' || g, 'u' || g, 'plan_1', 'active', true, $2, $2,
    $2::timestamptz + interval '30 days', $2, $2
FROM generate_series(1, $1::int) AS g
"""
OLD_INVOICES = """
INSERT INTO payment_invoices (id, user_id, subscription_id, provider, provider_invoice_id,
    status, currency, amount_crypto, amount_usd, created_at, updated_at)
SELECT 'old' || g, 'u' || g, 's' || g, 'simulated', 'sim_old' || g, 'paid', 'USDT', 29, 29,
    $2::timestamptz - interval '30 days', $2::timestamptz - interval '30 days'
FROM generate_series(1, $1::int) AS g
"""
DONE_CLAIMS = """
INSERT INTO nproxyd_renewal_claims (subscription_id, cycle_start, order_id, state, token,
    holder, available_at, attempts, invoice_id, created_at, updated_at)
SELECT 's' || g, $2::timestamptz - interval '30 days', 'renewal-s' || g || '-old', 'done',
    '', '', $2, 1, 'old' || g, $2, $2
FROM generate_series(1, $1::int) AS g
"""
HELD_CLAIMS = """
INSERT INTO nproxyd_renewal_claims (subscription_id, cycle_start, order_id, state, token,
    holder, available_at, attempts, created_at, updated_at)
SELECT 's' || g, $2, 'renewal-s' || g, 'claimed', $3, 'instance-a',
    $2::timestamptz + interval '1 day', 1, $2, $2
FROM generate_series(1, $1::int) AS g
"""


async def seed(db: Database, subscriptions: int) -> list[str]:
    """``subscriptions`` subscriptions with a paid invoice and a done claim of their previous
    cycle; the first ``BATCH`` hold a claim of the current cycle. Analyzed."""
    async with db.pool.acquire() as connection:
        # The rows are consistent by construction: skip the per-row foreign-key checks where
        # the role may (with NPROXYD_TEST_DSN seeding may be slower, the rows are the same).
        with suppress(asyncpg.InsufficientPrivilegeError):
            await connection.execute("SET session_replication_role = replica")
        await connection.execute(
            "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
            " monthly_price_usd, billing_currency) VALUES ('plan_1', 'monthly', 'M', 1, 29, 'USDT')"
        )
        await connection.execute(USERS, subscriptions)
        for statement in (SUBSCRIPTIONS, OLD_INVOICES, DONE_CLAIMS):
            await connection.execute(statement, subscriptions, CYCLE)
        await connection.execute(HELD_CLAIMS, BATCH, CYCLE, TOKEN)
        await connection.execute("RESET session_replication_role")
        await connection.execute("ANALYZE")
    return [f"s{number}" for number in range(1, BATCH + 1)]


def slots(ids: list[str]) -> dict[str, Any]:
    return {"subscription_ids": ids, "cycle_starts": [CYCLE] * len(ids)}


async def plans(db: Database, ids: list[str], mode: str) -> dict[str, Any]:
    count = len(ids)
    claim = await explain_analyze(
        db,
        "claim_renewal_slots",
        mode,
        **slots(ids),
        order_ids=[f"renewal-{sid}" for sid in ids],
        holder="instance-b",
        token="u" * 32,
        now=NOW + timedelta(days=2),  # the leases elapsed: every slot is taken over
        lease_until=NOW + timedelta(days=3),
    )
    commit = await explain_analyze(
        db,
        "commit_renewal_invoices",
        mode,
        **slots(ids),
        tokens=[TOKEN] * count,
        invoice_ids=[f"new-{sid}" for sid in ids],
        user_ids=[f"u{sid[1:]}" for sid in ids],
        provider_invoice_ids=[f"sim_{sid}" for sid in ids],
        currencies=["USDT"] * count,
        amounts=[29] * count,
        payment_addresses=["sim_addr"] * count,
        expires_at=[NOW + timedelta(days=1)] * count,
        to_addresses=[f"u{sid[1:]}@example.com" for sid in ids],
        bodies=["body"] * count,
        message_ids=[f"<{sid}@nproxy.example>" for sid in ids],
        provider="simulated",
        now=NOW,
        subject=RENEWAL_SUBJECT,
    )
    release = await explain_analyze(
        db,
        "release_renewal_claims",
        mode,
        **slots(ids),
        tokens=[TOKEN] * count,
        states=["retry"] * count,
        available_at=[NOW + timedelta(minutes=5)] * count,
        errors=["provider unavailable"] * count,
        now=NOW,
    )
    return {"claim": claim, "commit": commit, "release": release}


def arbiters(plan: Any) -> list[str]:
    return [
        index
        for node in nodes(plan)
        if node["Node Type"] == "ModifyTable"
        for index in node.get("Conflict Arbiter Indexes", [])
    ]


class TestBatchPlans:
    @pytest.mark.parametrize("subscriptions", [BATCH, 1_000_000], ids=["tiny", "1M"])
    async def test_batch_reaches_the_claims_through_their_primary_key(
        self, db: Database, subscriptions: int
    ) -> None:
        """Each slot of a batch is one probe of the claims' primary key, in every plan mode."""
        ids = await seed(db, subscriptions)

        for mode in PLAN_MODES:
            found = await plans(db, ids, mode)
            assert reads(found["claim"], CLAIMS) == [], mode
            assert arbiters(found["claim"]) == [CLAIMS_KEY], mode
            for name in ("commit", "release"):
                claim_reads = [read[1:] for read in reads(found[name], CLAIMS)]
                assert claim_reads == [("Index Scan", CLAIMS_KEY, BATCH)], (mode, name)
            invoice_reads = reads(found["commit"], "payment_invoices")
            assert all(read[3] == 1 or read[2] == BY_SUBSCRIPTION for read in invoice_reads), (
                mode,
                invoice_reads,
            )


def stored(subscription_id: str, token: str) -> StoredInvoice:
    return StoredInvoice(
        subscription_id=subscription_id,
        cycle_start=PERIOD_START,
        token=token,
        invoice_id=f"inv-{subscription_id}",
        user_id=f"user_{subscription_id}",
        provider_invoice_id=f"p-{subscription_id}",
        currency="USDT",
        amount=Decimal("29.00"),
        payment_address="addr",
        expires_at=None,
        to_address=f"user_{subscription_id}@example.com",
        body="body",
        message_id=f"<{subscription_id}@nproxy.example>",
    )


class TestForeignKeyChecks:
    async def test_checks_of_a_batch_reuse_their_plans_and_the_session_keeps_custom_plans(
        self, dsn: str
    ) -> None:
        """The rows a claim or a commit writes are checked (foreign keys, like every AFTER ROW
        trigger) under plan_cache_mode auto, so each check reuses its cached plan instead of
        being planned once per row and constraint; the statement itself and the next one on
        the connection are still planned per execution (force_custom_plan)."""
        db = await open_database(dsn, 1)  # one connection: the next statement runs on it
        try:
            await seed_plan(db.pool)
            ids = await seed_due(db.pool, 3)
            await note_plan_modes(db.pool, CLAIMS, "payment_invoices")
            store = RenewalStore(db)
            slots = [(sid, PERIOD_START, order_id(sid, PERIOD_START)) for sid in ids]
            lease_until = RENEWAL_NOW + timedelta(minutes=5)
            claimed = await store.claim(
                slots, holder="a", token="t", now=RENEWAL_NOW, lease_until=lease_until
            )
            completed = await store.commit(
                [stored(sid, "t") for sid in ids], provider="simulated", now=RENEWAL_NOW
            )
            noted = await noted_plan_modes(db.pool)
            session_mode = await db.pool.fetchval("SHOW plan_cache_mode")
        finally:
            await db.close()

        assert (len(claimed), len(completed)) == (3, 3)
        assert noted == [(CLAIMS, "auto")] * 3 + [("payment_invoices", "auto")] * 3
        assert session_mode == "force_custom_plan"


class TestPlanModes:
    async def test_the_generic_mode_explains_the_plan_postgresql_caches(self, db: Database) -> None:
        """Under force_generic_plan the explained plan keeps its parameters ($n), as the plan
        PostgreSQL caches for every execution; under auto the first execution's plan has the
        values in it (a custom plan)."""
        ids = await seed(db, BATCH)
        now = NOW + timedelta(days=2)

        def conflict_filter(plan: Any) -> str:
            [modify] = [node for node in nodes(plan) if node["Node Type"] == "ModifyTable"]
            return str(modify["Conflict Filter"])

        filters = {}
        for mode in PLAN_MODES:
            plan = await explain_analyze(
                db,
                "claim_renewal_slots",
                mode,
                **slots(ids[:3]),
                order_ids=[f"renewal-{sid}" for sid in ids[:3]],
                holder="instance-b",
                token="u" * 32,
                now=now,
                lease_until=now + timedelta(days=1),
            )
            filters[mode] = conflict_filter(plan)

        assert "$" not in filters["auto"] and "2026-03-12" in filters["auto"], filters
        assert "$" in filters["force_generic_plan"], filters
