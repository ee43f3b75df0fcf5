"""The renewal scheduler's watermark: a tick reads only what entered the window since the last
one, what is due again, and the whole window on a full pass (docs/design.md §2, renewal)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from nproxyd.actors.renewal_scheduler import RenewalScheduler
from nproxyd.core.errors import ProviderTransientError
from nproxyd.core.ports import InvoiceRequest, ProviderInvoice
from nproxyd.core.rules import order_id
from nproxyd.store.database import Database
from nproxyd.store.sql import bind
from tests import seed
from tests.conftest import open_database
from tests.integration.test_renewal_scheduler import (
    WrappedProvider,
    make_scheduler,
    plan_nodes,
    simulated,
)
from tests.renewal_checks import (
    NOW,
    PERIOD_START,
    SEEDED_PREFIX,
    Channel,
    assert_renewal_invariants,
    automatic_invoices,
    seed_due,
)

pytestmark = pytest.mark.anyio

LEAD = timedelta(hours=72)
TICK = timedelta(minutes=5)
FULL_PASS = timedelta(hours=1)
INSIDE = NOW + timedelta(hours=30)  # a period end well inside the window at NOW
READ_TABLES = ["subscriptions", "payment_invoices", "users"]


@pytest.fixture
async def one_connection(dsn: str) -> AsyncIterator[Database]:
    """A pool of one connection: every statement of the scheduler runs on it."""
    database = await open_database(dsn, 1)
    yield database
    await database.close()


async def rows_read(scheduler_db: Database, db: Database) -> int:
    """Rows and index entries read so far in the tables a candidate is examined in.

    The scheduler's one connection flushes its statistics first (PostgreSQL 15+ flushes a
    backend's counters lazily; forced, they are flushed before the statement returns).
    """
    await scheduler_db.pool.fetchval("SELECT pg_stat_force_next_flush()")
    value = await db.pool.fetchval(
        "SELECT (SELECT coalesce(sum(coalesce(seq_tup_read, 0)), 0) FROM pg_stat_user_tables"
        "        WHERE relname = ANY($1::text[]))"
        "     + (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes"
        "        WHERE relname = ANY($1::text[]))",
        READ_TABLES,
    )
    return int(value)


async def created_for(db: Database) -> list[str]:
    return sorted(row["subscription_id"] for row in await automatic_invoices(db.pool))


def scheduler_on(db: Database, channel: Channel) -> RenewalScheduler:
    return make_scheduler(db, simulated(), channel, full_pass_seconds=FULL_PASS.total_seconds())


async def web_invoiced(db: Database, count: int) -> None:
    """``count`` subscriptions inside the window whose cycle the web API already invoiced."""
    ids = await seed_due(db.pool, count, prefix="paid", period_end=INSIDE)
    for sub_id in ids:
        await seed.invoice(
            db.pool,
            f"{SEEDED_PREFIX}{sub_id}",
            user_id=f"user_{sub_id}",
            subscription_id=sub_id,
            created_at=PERIOD_START + timedelta(days=1),
        )


class TestIdleTick:
    async def test_an_idle_tick_after_a_full_pass_reads_no_subscription_of_the_window(
        self, db: Database, one_connection: Database, channel: Channel
    ) -> None:
        """After a full pass, a tick with nothing new due reads no row of the window."""
        await seed.plan(db.pool)
        await web_invoiced(db, 30)
        due = await seed_due(db.pool, 20, period_end=INSIDE)
        scheduler = scheduler_on(one_connection, channel)

        before = await rows_read(one_connection, db)
        first = await scheduler.tick(NOW)
        after_full_pass = await rows_read(one_connection, db)
        idle = await scheduler.tick(NOW + TICK)
        after_idle = await rows_read(one_connection, db)

        assert first.created_count == 20
        assert await created_for(db) == sorted(due)
        assert after_full_pass - before >= 50  # the full pass examined all 50 subscriptions
        assert (idle.candidates, idle.created_count) == (0, 0)
        assert after_idle - after_full_pass == 0
        await assert_renewal_invariants(db.pool)

    async def test_a_subscription_entering_the_window_is_picked_up(
        self, db: Database, channel: Channel
    ) -> None:
        """A period end that enters the window after a tick is invoiced by the next tick."""
        await seed.plan(db.pool)
        await web_invoiced(db, 5)
        late = await seed.subscription(
            db.pool, "late", period_start=PERIOD_START, period_end=NOW + LEAD + 2 * TICK
        )
        scheduler = scheduler_on(db, channel)

        first = await scheduler.tick(NOW)
        second = await scheduler.tick(NOW + TICK)
        third = await scheduler.tick(NOW + 3 * TICK)

        assert (first.created_count, second.created_count, third.created_count) == (0, 0, 1)
        assert await created_for(db) == [late]
        await assert_renewal_invariants(db.pool)

    async def test_a_subscription_added_above_the_mark_is_picked_up(
        self, db: Database, channel: Channel
    ) -> None:
        """A new subscription whose period ends after the examined part is read next tick."""
        await seed.plan(db.pool)
        await web_invoiced(db, 5)
        scheduler = scheduler_on(db, channel)
        await scheduler.tick(NOW)
        added = await seed.subscription(
            db.pool, "added", period_start=PERIOD_START, period_end=NOW + LEAD + TICK / 2
        )

        report = await scheduler.tick(NOW + TICK)

        assert report.created_count == 1
        assert await created_for(db) == [added]


class FailingFirst(WrappedProvider):
    """Answers the first call for one subscription with a transient failure."""

    def __init__(self, subscription_id: str) -> None:
        super().__init__(simulated())
        self.failing = subscription_id
        self.failed = False

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice:
        if request.subscription_id == self.failing and not self.failed:
            self.failed = True
            raise ProviderTransientError("provider unavailable")
        return await super().create_invoice(request, now)


class TestUnresolvedCandidates:
    async def test_a_failed_candidate_is_retried_once_its_retry_is_due(
        self, db: Database, channel: Channel
    ) -> None:
        """A slot released for retry inside the examined part is read again when it is due."""
        await seed.plan(db.pool)
        await web_invoiced(db, 5)
        flaky = await seed.subscription(
            db.pool, "flaky", period_start=PERIOD_START, period_end=INSIDE
        )
        provider = FailingFirst(flaky)
        scheduler = make_scheduler(
            db,
            provider,
            channel,
            full_pass_seconds=FULL_PASS.total_seconds(),
            retry_base_seconds=60.0,
            retry_max_seconds=120.0,
        )

        first = await scheduler.tick(NOW)
        retried = await scheduler.tick(NOW + TICK)

        assert (first.transient_failures, first.created_count) == (1, 0)
        assert retried.created_count == 1
        assert await created_for(db) == [flaky]
        assert provider.failed
        attempts = await db.pool.fetchval(
            "SELECT attempts FROM nproxyd_renewal_claims WHERE order_id = $1",
            order_id(flaky, PERIOD_START),
        )
        assert attempts == 2  # the same slot, so the same order id at the provider
        await assert_renewal_invariants(db.pool)

    async def test_a_claim_held_by_another_instance_is_taken_over_after_its_lease(
        self, db: Database, channel: Channel
    ) -> None:
        """A slot another instance holds is not lost behind the mark when that lease elapses."""
        await seed.plan(db.pool)
        await web_invoiced(db, 5)
        held = await seed.subscription(
            db.pool, "held", period_start=PERIOD_START, period_end=INSIDE
        )
        await db.pool.execute(
            "INSERT INTO nproxyd_renewal_claims (subscription_id, cycle_start, order_id, state,"
            " token, holder, available_at, attempts)"
            " VALUES ($1, $2, $3, 'claimed', 'other-token', 'other', $4, 1)",
            held,
            PERIOD_START,
            order_id(held, PERIOD_START),
            NOW + 2 * TICK,  # the other instance died; its lease ends then
        )
        scheduler = scheduler_on(db, channel)

        reports = [await scheduler.tick(NOW + n * TICK) for n in range(4)]

        assert [report.created_count for report in reports] == [0, 0, 1, 0]
        assert await created_for(db) == [held]
        await assert_renewal_invariants(db.pool)

    async def test_a_retry_settled_by_a_web_invoice_does_not_hold_the_watermark(
        self, db: Database, one_connection: Database, channel: Channel
    ) -> None:
        """A due retry whose cycle the web API invoiced meanwhile is not read again each tick."""
        await seed.plan(db.pool)
        await web_invoiced(db, 30)
        settled = await seed.subscription(
            db.pool, "settled", period_start=PERIOD_START, period_end=INSIDE
        )
        await db.pool.execute(
            "INSERT INTO nproxyd_renewal_claims (subscription_id, cycle_start, order_id, state,"
            " available_at, attempts) VALUES ($1, $2, $3, 'retry', $4, 1)",
            settled,
            PERIOD_START,
            order_id(settled, PERIOD_START),
            NOW + TICK,
        )
        await seed.invoice(
            db.pool,
            f"{SEEDED_PREFIX}{settled}",
            user_id=f"user_{settled}",
            subscription_id=settled,
            created_at=PERIOD_START + timedelta(days=2),
        )
        scheduler = scheduler_on(one_connection, channel)
        await scheduler.tick(NOW)

        before = await rows_read(one_connection, db)
        report = await scheduler.tick(NOW + 2 * TICK)
        after = await rows_read(one_connection, db)

        assert (report.candidates, report.created_count) == (0, 0)
        assert after - before <= 2  # the settled slot's own look-ups, not the window's 31 rows
        assert await created_for(db) == []


class TestFullPass:
    async def test_a_subscription_changed_inside_the_window_waits_for_the_full_pass(
        self, db: Database, channel: Channel
    ) -> None:
        """What the web API changes below the mark is read by the next full pass."""
        await seed.plan(db.pool)
        await web_invoiced(db, 5)
        activated = await seed.subscription(
            db.pool,
            "activated",
            period_start=PERIOD_START,
            period_end=INSIDE,
            status="pending_activation",
        )
        scheduler = scheduler_on(db, channel)
        await scheduler.tick(NOW)
        await db.pool.execute("UPDATE subscriptions SET status = 'active' WHERE id = $1", activated)
        backdated = await seed.subscription(
            db.pool, "backdated", period_start=PERIOD_START, period_end=INSIDE
        )

        before_full_pass = await scheduler.tick(NOW + TICK)
        full_pass = await scheduler.tick(NOW + FULL_PASS)

        assert before_full_pass.candidates == 0
        assert full_pass.created_count == 2
        assert await created_for(db) == sorted([activated, backdated])
        await assert_renewal_invariants(db.pool)

    async def test_a_new_process_starts_with_a_full_pass(
        self, db: Database, channel: Channel
    ) -> None:
        """The watermark lives in the process: a fresh scheduler reads the whole window."""
        await seed.plan(db.pool)
        await scheduler_on(db, channel).tick(NOW)
        changed = await seed.subscription(
            db.pool, "changed", period_start=PERIOD_START, period_end=INSIDE
        )

        report = await scheduler_on(db, channel).tick(NOW + TICK)

        assert report.created_count == 1
        assert await created_for(db) == [changed]

    async def test_a_clock_that_went_back_reads_the_whole_window(
        self, db: Database, channel: Channel
    ) -> None:
        """A tick earlier than the last one does not trust the mark: it is a full pass."""
        await seed.plan(db.pool)
        scheduler = scheduler_on(db, channel)
        await scheduler.tick(NOW + TICK)
        early = await seed.subscription(
            db.pool, "early", period_start=PERIOD_START, period_end=NOW + TICK
        )

        report = await scheduler.tick(NOW)

        assert report.created_count == 1
        assert await created_for(db) == [early]


class TestRetryFloorPlan:
    async def test_the_retry_floor_is_driven_by_the_open_claims(self, db: Database) -> None:
        """With 20,000 subscriptions in the window, the floor never reads the window itself."""
        await seed.plan(db.pool)
        ids = await seed_due(db.pool, 20_000, period_end=INSIDE)
        await db.pool.execute(
            "INSERT INTO nproxyd_renewal_claims (subscription_id, cycle_start, order_id, state,"
            " available_at, attempts)"
            " SELECT id, $2, 'o-' || id, CASE WHEN id = ANY($3::text[]) THEN 'retry'"
            "  ELSE 'done' END, $1, 1 FROM subscriptions",
            NOW,
            PERIOD_START,
            ids[:3],
        )
        await db.pool.execute("ANALYZE")
        text, *args = bind("renewal_retry_floor", (NOW, NOW + LEAD), {})

        raw = await db.pool.fetchval("EXPLAIN (FORMAT JSON) " + text, *args)
        nodes = plan_nodes(json.loads(raw) if isinstance(raw, str) else raw)
        floor = await db.pool.fetchval(text, *args)

        assert floor == INSIDE
        scans = {(node["Node Type"], node.get("Index Name")) for node in nodes}
        assert ("Index Scan", "subscriptions_pkey") in scans, scans
        subscription_scans = [
            node for node in nodes if node.get("Relation Name") == "subscriptions"
        ]
        assert all(node.get("Index Name") == "subscriptions_pkey" for node in subscription_scans)
        claim_scans = [
            node for node in nodes if node.get("Relation Name") == "nproxyd_renewal_claims"
        ]
        assert [node.get("Index Name") for node in claim_scans] == ["nproxyd_renewal_claims_open"]
