"""The renewal scheduler against a real PostgreSQL: docs/design.md §2 renewal invoices, §3 1-6."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from nproxyd.actors.renewal_scheduler import RenewalPorts, RenewalScheduler, RenewalSettings
from nproxyd.adapters.payment_nowpayments import NowPaymentsProvider
from nproxyd.adapters.payment_simulated import SimulatedPaymentProvider
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import NowPaymentsConfig, SimulatedPaymentConfig
from nproxyd.core.messages import OutboxReady
from nproxyd.core.ports import InvoiceRequest, PaymentProvider, ProviderInvoice
from nproxyd.core.records import (
    CompletedSlot,
    RenewalCandidate,
    StoredInvoice,
    UnreadableCandidate,
)
from nproxyd.core.rules import order_id
from nproxyd.store.database import Database
from nproxyd.store.sql import bind
from nproxyd.store.stores import RenewalStore
from tests import seed
from tests.fakes.nowpayments import FakeNowPayments, Mode
from tests.renewal_checks import (
    NOW,
    PERIOD_END,
    PERIOD_START,
    Channel,
    assert_renewal_invariants,
    automatic_invoices,
    seed_due,
)

pytestmark = pytest.mark.anyio

APP_BASE_URL = "https://app.nproxy.example/"
SUBJECT = "Your nproxy subscription renewal invoice"
Hook = Callable[[InvoiceRequest], Awaitable[None]]


class WrappedProvider:
    """A provider around another one: runs a hook before each call, counts calls in flight."""

    def __init__(self, inner: PaymentProvider, before: Hook | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.before = before
        self.requests: list[InvoiceRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.before is not None:
                await self.before(request)
            return await self.inner.create_invoice(request, now)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingStore(RenewalStore):
    """The real store, remembering the limit of each candidates query."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.candidate_limits: list[int] = []

    async def candidates(
        self, now: datetime, window_end: datetime, after: tuple[datetime, str], limit: int
    ) -> list[RenewalCandidate | UnreadableCandidate]:
        self.candidate_limits.append(limit)
        return await super().candidates(now, window_end, after, limit)


class OverlapStore(RenewalStore):
    """The real store; a commit waits (up to 2 s) for another one to start alongside it."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.in_flight = 0
        self.max_in_flight = 0
        self.overlapped = anyio.Event()

    async def commit(
        self, invoices: Sequence[StoredInvoice], *, provider: str, now: datetime
    ) -> list[CompletedSlot]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.in_flight > 1:
                self.overlapped.set()
            with anyio.move_on_after(2):
                await self.overlapped.wait()
            return await super().commit(invoices, provider=provider, now=now)
        finally:
            self.in_flight -= 1


def simulated(*, latency_ms: int = 0, failure_rate: float = 0.0) -> SimulatedPaymentProvider:
    config = SimulatedPaymentConfig(
        invoice_ttl_hours=24, latency_ms=latency_ms, failure_rate=failure_rate
    )
    return SimulatedPaymentProvider(config, SystemClock().sleep, random.Random(5))


def nowpayments(fake: FakeNowPayments) -> NowPaymentsProvider:
    config = NowPaymentsConfig(api_base_url=fake.url, api_key=fake.api_key, timeout_seconds=5)

    async def no_sleep(_: float) -> None:
        return None

    return NowPaymentsProvider(config, sleep=no_sleep)


def make_scheduler(
    db: Database,
    provider: PaymentProvider,
    channel: Channel,
    *,
    store: RenewalStore | None = None,
    **overrides: Any,
) -> RenewalScheduler:
    values: dict[str, Any] = {
        "interval_seconds": 300.0,
        "renewal_lead_time_hours": 72.0,
        "batch_size": 500,
        "provider_concurrency": 8,
        "claim_lease_seconds": 120.0,
        "failed_retry_hours": 24.0,
        "app_base_url": APP_BASE_URL,
        "from_address": "nproxy billing <billing@nproxy.example>",
        "instance_id": "test-instance",
        "retry_base_seconds": 60.0,
        "retry_max_seconds": 3600.0,
    }
    values.update(overrides)
    ports = RenewalPorts(store=store or RenewalStore(db), provider=provider, outbox=channel.outbox)
    return RenewalScheduler(RenewalSettings(**values), ports, SystemClock(), rng=random.Random(11))


def expected_body(address: str | None, expires_at: str | None) -> str:
    lines = [
        "Your current subscription period is ending soon.",
        "Current access ends at 2026-03-12T11:00:00.000Z.",
        "Invoice amount: 29 USDT.",
    ]
    if address:
        lines.append(f"Payment address: {address}.")
    if expires_at:
        lines.append(f"Invoice expires at {expires_at}.")
    lines.append("Open billing: https://app.nproxy.example/billing")
    return "\n".join(lines)


async def worked_example(db: Database, sub_id: str = "sub_1") -> str:
    """Plan 29 USDT; one active subscription in the worked example's period."""
    await seed.plan(db.pool, price=Decimal("29.00"), currency="USDT")
    return await seed.subscription(
        db.pool, sub_id, period_start=PERIOD_START, period_end=PERIOD_END
    )


async def claims(db: Database) -> list[dict[str, Any]]:
    rows = await db.pool.fetch("SELECT * FROM nproxyd_renewal_claims ORDER BY subscription_id")
    return [dict(row) for row in rows]


async def count(db: Database, table: str) -> int:
    value: int = await db.pool.fetchval(f"SELECT count(*) FROM {table}")
    return value


class TestWorkedExample:
    async def test_creates_one_invoice_and_one_mail(self, db: Database, channel: Channel) -> None:
        """The worked example creates one pending 29 USDT invoice and its exact renewal mail."""
        await worked_example(db)
        with capture_logs() as logs:
            report = await make_scheduler(db, simulated(), channel).tick(NOW)

        assert (report.candidates, report.claimed, report.created_count) == (1, 1, 1)
        created = [entry for entry in logs if entry["event"] == "renewal_invoices_created"]
        assert [entry["created_count"] for entry in created] == [1]
        [invoice] = await automatic_invoices(db.pool)
        assert invoice["subscription_id"] == "sub_1"
        assert invoice["user_id"] == "user_sub_1"
        assert invoice["status"] == "pending"
        assert invoice["provider"] == "simulated"
        assert invoice["provider_invoice_id"].startswith("sim_")
        assert invoice["amount_usd"] == Decimal("29")
        assert invoice["amount_crypto"] == Decimal("29")
        assert invoice["currency"] == "USDT"
        assert invoice["payment_address"].startswith("sim_addr_")
        assert invoice["expires_at"] == NOW + timedelta(hours=24)
        assert invoice["created_at"] == NOW

        [mail] = await db.pool.fetch("SELECT * FROM mail_outbox")
        assert mail["dedupe_key"] == f"renewal-invoice:{invoice['id']}"
        assert mail["subject"] == SUBJECT
        assert mail["to_address"] == "user_sub_1@example.com"
        assert mail["status"] == "pending"
        assert mail["body"] == expected_body(invoice["payment_address"], "2026-03-10T12:00:00.000Z")
        assert channel.received() == [OutboxReady(count=1)]
        await assert_renewal_invariants(db.pool)

    async def test_second_tick_creates_nothing(self, db: Database, channel: Channel) -> None:
        """A second tick neither calls the provider, stores, nor logs an invoice creation."""
        await worked_example(db)
        provider = WrappedProvider(simulated())
        scheduler = make_scheduler(db, provider, channel)
        await scheduler.tick(NOW)
        channel.received()

        with capture_logs() as logs:
            report = await scheduler.tick(NOW)
            later = await scheduler.tick(NOW + timedelta(hours=1))

        assert (report.created_count, later.created_count) == (0, 0)
        assert [entry for entry in logs if entry["event"] == "renewal_invoices_created"] == []
        assert (report.candidates, later.candidates) == (0, 0)
        assert len(provider.requests) == 1
        assert (await count(db, "payment_invoices"), await count(db, "mail_outbox")) == (1, 1)
        assert channel.received() == []
        await assert_renewal_invariants(db.pool)

    @pytest.mark.parametrize(
        ("status", "created_at", "created"),
        [
            ("expired", datetime(2026, 3, 9, 9, 0, tzinfo=UTC), 0),
            ("pending", datetime(2026, 3, 9, 9, 0, tzinfo=UTC), 0),
            ("paid", datetime(2026, 3, 9, 9, 0, tzinfo=UTC), 0),
            ("canceled", datetime(2026, 3, 9, 9, 0, tzinfo=UTC), 0),
            ("expired", PERIOD_START, 0),  # exactly at the cycle start is in the cycle
            ("paid", PERIOD_START - timedelta(seconds=1), 1),  # the previous cycle's invoice
        ],
        ids=["expired", "pending", "paid", "canceled", "at-cycle-start", "previous-cycle"],
    )
    async def test_an_invoice_in_the_cycle_blocks_creation(
        self, db: Database, channel: Channel, status: str, created_at: datetime, created: int
    ) -> None:
        """An invoice created from the cycle start on, whatever its status, means nothing is
        created (the provider is not asked); one created before it belongs to the last cycle."""
        await worked_example(db)
        await seed.invoice(
            db.pool,
            "seed-manual",
            user_id="user_sub_1",
            subscription_id="sub_1",
            status=status,
            created_at=created_at,
        )
        provider = WrappedProvider(simulated())
        report = await make_scheduler(db, provider, channel).tick(NOW)

        assert report.created_count == created
        assert len(provider.requests) == created
        assert len(await automatic_invoices(db.pool)) == created
        assert await count(db, "mail_outbox") == created
        await assert_renewal_invariants(db.pool)

    async def test_provider_is_called_only_for_a_claimed_slot(
        self, db: Database, channel: Channel
    ) -> None:
        """When the provider is called the slot's claim is committed, with the same order_id."""
        await worked_example(db)
        seen: list[dict[str, Any]] = []

        async def look_at_claim(request: InvoiceRequest) -> None:
            row = await db.pool.fetchrow(
                "SELECT state, order_id, token, holder FROM nproxyd_renewal_claims"
                " WHERE subscription_id = $1",
                request.subscription_id,
            )
            seen.append(dict(row) if row is not None else {})

        provider = WrappedProvider(simulated(), before=look_at_claim)
        await make_scheduler(db, provider, channel).tick(NOW)

        [request] = provider.requests
        assert request.order_id == order_id("sub_1", PERIOD_START)
        assert request.amount_usd == Decimal("29")
        assert len(seen) == 1
        assert seen[0]["state"] == "claimed"
        assert seen[0]["order_id"] == request.order_id
        assert seen[0]["holder"] == "test-instance"
        assert seen[0]["token"] != ""


class TestCandidates:
    async def test_only_due_active_manual_subscriptions(
        self, db: Database, channel: Channel
    ) -> None:
        """Only active, manually renewing subscriptions with now < end <= now + lead get one."""
        await seed.plan(db.pool)
        lead_end = NOW + timedelta(hours=72)
        cases: dict[str, dict[str, Any]] = {
            "due": {},
            "due_at_window_end": {"period_end": lead_end},
            "ends_now": {"period_end": NOW},
            "ended": {"period_end": NOW - timedelta(hours=1)},
            "beyond_window": {"period_end": lead_end + timedelta(seconds=1)},
            "renews_automatically": {"renews_manually": False},
            "expired": {"status": "expired"},
            "pending_activation": {"status": "pending_activation"},
        }
        for sub_id, fields in cases.items():
            values: dict[str, Any] = {"period_start": PERIOD_START, "period_end": PERIOD_END}
            values.update(fields)
            await seed.subscription(db.pool, sub_id, **values)

        report = await make_scheduler(db, simulated(), channel).tick(NOW)

        invoiced = {row["subscription_id"] for row in await automatic_invoices(db.pool)}
        assert invoiced == {"due", "due_at_window_end"}
        assert report.created_count == 2
        claimed = {row["subscription_id"] for row in await claims(db)}
        assert claimed == {"due", "due_at_window_end"}
        await assert_renewal_invariants(db.pool)

    async def test_lead_time_comes_from_settings(self, db: Database, channel: Channel) -> None:
        """With a 24 h lead a subscription ending in 71 h is not yet due."""
        await seed.plan(db.pool)
        await seed.subscription(
            db.pool, "soon", period_start=PERIOD_START, period_end=NOW + timedelta(hours=23)
        )
        await seed.subscription(
            db.pool, "later", period_start=PERIOD_START, period_end=NOW + timedelta(hours=71)
        )
        await make_scheduler(db, simulated(), channel, renewal_lead_time_hours=24.0).tick(NOW)
        invoiced = {row["subscription_id"] for row in await automatic_invoices(db.pool)}
        assert invoiced == {"soon"}

    async def test_cycle_start_falls_back_to_activated_at_then_created_at(
        self, db: Database, channel: Channel
    ) -> None:
        """Without current_period_start the cycle starts at activated_at, else at created_at."""
        await seed.plan(db.pool)
        activated = datetime(2026, 2, 20, tzinfo=UTC)
        created = datetime(2026, 2, 10, tzinfo=UTC)
        rows = [
            # id, activated_at, created_at, an invoice created at (None: no invoice)
            ("by_activation", activated, created, None),
            ("by_creation", None, created, None),
            ("blocked_after_activation", activated, created, activated + timedelta(days=1)),
            ("blocked_after_creation", None, created, created + timedelta(days=1)),
            ("before_activation", activated, created, activated - timedelta(days=1)),
        ]
        for sub_id, activated_at, created_at, invoice_at in rows:
            await seed.user(db.pool, f"user_{sub_id}")
            await db.pool.execute(
                "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
                " activated_at, current_period_start, current_period_end, created_at)"
                " VALUES ($1, $2, 'plan_1', 'active', true, $3, NULL, $4, $5)",
                sub_id,
                f"user_{sub_id}",
                activated_at,
                PERIOD_END,
                created_at,
            )
            if invoice_at is not None:
                await seed.invoice(
                    db.pool,
                    f"seed-{sub_id}",
                    user_id=f"user_{sub_id}",
                    subscription_id=sub_id,
                    status="expired",
                    created_at=invoice_at,
                )

        await make_scheduler(db, simulated(), channel).tick(NOW)

        cycle_starts = {row["subscription_id"]: row["cycle_start"] for row in await claims(db)}
        assert cycle_starts == {
            "by_activation": activated,
            "by_creation": created,
            "before_activation": activated,
        }
        invoiced = {row["subscription_id"] for row in await automatic_invoices(db.pool)}
        assert invoiced == {"by_activation", "by_creation", "before_activation"}
        await assert_renewal_invariants(db.pool)


class TestProviderFailures:
    async def test_transient_failure_schedules_a_retry(
        self, db: Database, channel: Channel
    ) -> None:
        """A transient failure stores nothing and leaves the claim in 'retry' with a backoff."""
        await worked_example(db)
        report = await make_scheduler(db, simulated(failure_rate=1.0), channel).tick(NOW)

        assert (report.claimed, report.created_count, report.transient_failures) == (1, 0, 1)
        [claim] = await claims(db)
        assert claim["state"] == "retry"
        assert NOW < claim["available_at"] <= NOW + timedelta(seconds=60)
        assert "simulated provider failure" in claim["last_error"]
        assert claim["token"] == ""
        assert await count(db, "payment_invoices") == 0
        assert await count(db, "mail_outbox") == 0
        assert channel.received() == []

    async def test_a_programming_error_fails_the_tick_and_schedules_no_retry(
        self, db: Database, channel: Channel
    ) -> None:
        """Only the provider error family is a failed call: a TypeError fails the tick and the
        claim is left to its lease (no retry recorded with the bug as its reason)."""
        await worked_example(db)

        async def bug(request: InvoiceRequest) -> None:
            raise TypeError("a bug")

        provider = WrappedProvider(simulated(), before=bug)
        with pytest.raises(BaseException) as caught:
            await make_scheduler(db, provider, channel).tick(NOW)

        assert (
            caught.group_contains(TypeError)
            if isinstance(caught.value, BaseExceptionGroup)
            else isinstance(caught.value, TypeError)
        )
        [claim] = await claims(db)
        assert (claim["state"], claim["last_error"]) == ("claimed", None)
        assert await count(db, "payment_invoices") == 0

    async def test_retry_waits_for_its_time_then_creates_one(
        self, db: Database, channel: Channel
    ) -> None:
        """Before available_at nothing is tried; after it a healthy provider creates one invoice."""
        await worked_example(db)
        await make_scheduler(db, simulated(failure_rate=1.0), channel).tick(NOW)
        [claim] = await claims(db)
        healthy = WrappedProvider(simulated())
        scheduler = make_scheduler(db, healthy, channel)

        early = await scheduler.tick(claim["available_at"] - timedelta(seconds=1))
        assert (early.claimed, len(healthy.requests)) == (0, 0)

        report = await scheduler.tick(claim["available_at"] + timedelta(seconds=1))
        assert report.created_count == 1
        assert [request.order_id for request in healthy.requests] == [claim["order_id"]]
        [invoice] = await automatic_invoices(db.pool)
        [done] = await claims(db)
        assert (done["state"], done["invoice_id"], done["attempts"]) == ("done", invoice["id"], 2)
        assert done["order_id"] == claim["order_id"]
        await assert_renewal_invariants(db.pool)

    async def test_http_500_then_recovery_reuses_the_order_id(
        self, db: Database, channel: Channel
    ) -> None:
        """After a NOWPayments 500 the retry asks again with the same order_id and stores one."""
        await worked_example(db)
        async with FakeNowPayments() as fake:
            provider = nowpayments(fake)
            try:
                fake.set_mode(Mode.SERVER_ERROR)
                failed = await make_scheduler(db, provider, channel).tick(NOW)
                [claim] = await claims(db)
                assert failed.transient_failures == 1
                assert claim["state"] == "retry"
                assert claim["available_at"] > NOW
                assert "500" in claim["last_error"]
                assert await count(db, "payment_invoices") == 0

                fake.set_mode(Mode.OK)
                later = claim["available_at"] + timedelta(seconds=1)
                report = await make_scheduler(db, provider, channel).tick(later)
            finally:
                await provider.aclose()

        assert report.created_count == 1
        assert fake.calls_for(claim["order_id"]) == 2
        [payment] = fake.payments
        [invoice] = await automatic_invoices(db.pool)
        assert invoice["provider"] == "nowpayments"
        assert invoice["provider_invoice_id"] == payment["payment_id"]
        assert invoice["payment_address"] == payment["pay_address"]
        [mail] = await db.pool.fetch("SELECT body FROM mail_outbox")
        assert f"Payment address: {payment['pay_address']}." in mail["body"]
        await assert_renewal_invariants(db.pool)

    async def test_permanent_failure_parks_the_slot(self, db: Database, channel: Channel) -> None:
        """A 400 AMOUNT_MINIMAL_ERROR marks the claim 'failed' for failed_retry_hours, logged."""
        await worked_example(db)
        async with FakeNowPayments() as fake:
            provider = nowpayments(fake)
            try:
                fake.set_mode(Mode.AMOUNT_MINIMAL)
                scheduler = make_scheduler(db, provider, channel, failed_retry_hours=6.0)
                with capture_logs() as logs:
                    report = await scheduler.tick(NOW)
                again = await scheduler.tick(NOW + timedelta(hours=5))
            finally:
                await provider.aclose()

        assert (report.permanent_failures, report.created_count) == (1, 0)
        [claim] = await claims(db)
        assert claim["state"] == "failed"
        assert claim["available_at"] == NOW + timedelta(hours=6)
        assert "AMOUNT_MINIMAL_ERROR" in claim["last_error"]
        assert await count(db, "payment_invoices") == 0
        assert await count(db, "mail_outbox") == 0
        failures = [entry for entry in logs if entry["event"] == "renewal_invoice_failed"]
        assert [entry["subscription_id"] for entry in failures] == ["sub_1"]
        assert failures[0]["log_level"] == "warning"
        assert (again.claimed, len(fake.requests)) == (0, 1)

    async def test_failed_slot_is_tried_again_after_the_cool_off(
        self, db: Database, channel: Channel
    ) -> None:
        """Once failed_retry_hours have passed, a failed slot is claimed and invoiced again."""
        await worked_example(db)
        async with FakeNowPayments() as fake:
            provider = nowpayments(fake)
            try:
                fake.set_mode(Mode.AMOUNT_MINIMAL)
                scheduler = make_scheduler(db, provider, channel, failed_retry_hours=6.0)
                await scheduler.tick(NOW)
                fake.set_mode(Mode.OK)
                report = await scheduler.tick(NOW + timedelta(hours=6))
            finally:
                await provider.aclose()
        assert report.created_count == 1
        assert len(await automatic_invoices(db.pool)) == 1
        await assert_renewal_invariants(db.pool)


class TestClaims:
    async def test_stolen_claim_commits_nothing(self, db: Database, channel: Channel) -> None:
        """When another holder takes the claim during the provider call, nothing is stored."""
        await worked_example(db)

        async def steal(request: InvoiceRequest) -> None:
            await db.pool.execute(
                "UPDATE nproxyd_renewal_claims SET token = 'stolen', holder = 'other'"
                " WHERE subscription_id = $1",
                request.subscription_id,
            )

        report = await make_scheduler(db, WrappedProvider(simulated(), before=steal), channel).tick(
            NOW
        )

        assert (report.claimed, report.created_count, report.superseded) == (1, 0, 0)
        assert await count(db, "payment_invoices") == 0
        assert await count(db, "mail_outbox") == 0
        [claim] = await claims(db)
        assert (claim["state"], claim["token"], claim["holder"]) == ("claimed", "stolen", "other")
        assert channel.received() == []

    async def test_commit_is_fenced_by_the_claim_token(self, db: Database) -> None:
        """store.commit with a wrong token, or a second time, stores nothing."""
        await worked_example(db)
        store = RenewalStore(db)
        slot_order = order_id("sub_1", PERIOD_START)
        [slot] = await store.claim(
            [("sub_1", PERIOD_START, slot_order)],
            holder="a",
            token="token-a",
            now=NOW,
            lease_until=NOW + timedelta(minutes=2),
        )
        assert (slot.subscription_id, slot.order_id, slot.attempts) == ("sub_1", slot_order, 1)

        def invoice(token: str, invoice_id: str) -> StoredInvoice:
            return StoredInvoice(
                subscription_id="sub_1",
                cycle_start=PERIOD_START,
                token=token,
                invoice_id=invoice_id,
                user_id="user_sub_1",
                provider_invoice_id=f"p-{invoice_id}",
                currency="USDT",
                amount=Decimal("29.00"),
                payment_address="addr",
                expires_at=None,
                to_address="user_sub_1@example.com",
                body="body",
                message_id=f"<{invoice_id}@nproxy.example>",
            )

        wrong = await store.commit([invoice("token-b", "inv-b")], provider="simulated", now=NOW)
        assert wrong == []
        assert (await count(db, "payment_invoices"), await count(db, "mail_outbox")) == (0, 0)

        right = await store.commit([invoice("token-a", "inv-a")], provider="simulated", now=NOW)
        assert [(done.subscription_id, done.superseded) for done in right] == [("sub_1", False)]

        replay = await store.commit([invoice("token-a", "inv-c")], provider="simulated", now=NOW)
        assert replay == []
        assert [row["id"] for row in await automatic_invoices(db.pool)] == ["inv-a"]
        await assert_renewal_invariants(db.pool)

    async def test_live_claim_is_not_taken_twice(self, db: Database) -> None:
        """A second claim of a slot within its lease wins nothing; after the lease it wins."""
        await worked_example(db)
        store = RenewalStore(db)
        slot = [("sub_1", PERIOD_START, order_id("sub_1", PERIOD_START))]
        lease_until = NOW + timedelta(minutes=2)
        first = await store.claim(slot, holder="a", token="a", now=NOW, lease_until=lease_until)
        second = await store.claim(
            slot, holder="b", token="b", now=NOW + timedelta(minutes=1), lease_until=lease_until
        )
        third = await store.claim(
            slot, holder="c", token="c", now=lease_until, lease_until=lease_until
        )
        assert (len(first), len(second), len(third)) == (1, 0, 1)
        assert third[0].attempts == 2
        [claim] = await claims(db)
        assert (claim["holder"], claim["token"]) == ("c", "c")

    async def test_manual_invoice_during_the_call_supersedes(
        self, db: Database, channel: Channel
    ) -> None:
        """A manual invoice created between claim and commit completes the slot as superseded."""
        await worked_example(db)

        async def user_pays_by_hand(request: InvoiceRequest) -> None:
            await seed.invoice(
                db.pool,
                "seed-manual",
                user_id="user_sub_1",
                subscription_id=request.subscription_id,
                created_at=NOW - timedelta(minutes=1),
            )

        provider = WrappedProvider(simulated(), before=user_pays_by_hand)
        scheduler = make_scheduler(db, provider, channel)
        report = await scheduler.tick(NOW)

        assert (report.created_count, report.superseded) == (0, 1)
        ids = [row["id"] for row in await db.pool.fetch("SELECT id FROM payment_invoices")]
        assert ids == ["seed-manual"]
        assert await count(db, "mail_outbox") == 0
        [claim] = await claims(db)
        assert (claim["state"], claim["invoice_id"]) == ("done", None)
        assert claim["last_error"].startswith("superseded")
        assert channel.received() == []
        assert (await scheduler.tick(NOW + timedelta(hours=1))).claimed == 0


class TestBadRows:
    @pytest.mark.parametrize("batch_size", [500, 2])
    async def test_bad_rows_are_skipped_and_good_ones_invoiced(
        self, db: Database, channel: Channel, batch_size: int
    ) -> None:
        """Bad plans and addresses are skipped and logged by id; the good row still gets one."""
        await seed.plan(db.pool)
        await seed.plan(db.pool, plan_id="plan_null", price=None)
        await seed.plan(db.pool, plan_id="plan_negative", price=Decimal("-5.00"))
        await seed.plan(db.pool, plan_id="plan_no_currency", currency="")
        bad: dict[str, dict[str, Any]] = {
            "bad_null_price": {"plan_id": "plan_null"},
            "bad_negative_price": {"plan_id": "plan_negative"},
            "bad_empty_currency": {"plan_id": "plan_no_currency"},
            "bad_email": {"email": "not an address"},
        }
        for offset, (sub_id, fields) in enumerate(bad.items()):
            # Bad rows end first, so they come before the good one in keyset order.
            end = PERIOD_END - timedelta(hours=4 - offset)
            await seed.subscription(
                db.pool, sub_id, period_start=PERIOD_START, period_end=end, **fields
            )
        await seed.subscription(db.pool, "good", period_start=PERIOD_START, period_end=PERIOD_END)
        scheduler = make_scheduler(db, simulated(), channel, batch_size=batch_size)

        with capture_logs() as logs:
            report = await scheduler.tick(NOW)

        assert (report.candidates, report.skipped_bad, report.created_count) == (5, 4, 1)
        skipped = {
            entry["subscription_id"]: entry["reason"]
            for entry in logs
            if entry["event"] == "renewal_candidate_skipped"
        }
        assert skipped == {
            "bad_null_price": "plan price is missing",
            "bad_negative_price": "plan price is negative",
            "bad_empty_currency": "plan billing currency is empty",
            "bad_email": "user email: address is not a plain local@domain",
        }
        invoiced = [row["subscription_id"] for row in await automatic_invoices(db.pool)]
        assert invoiced == ["good"]
        assert [row["subscription_id"] for row in await claims(db)] == ["good"]
        await assert_renewal_invariants(db.pool)


class TestBatching:
    async def test_keyset_batches_and_bounded_concurrency(
        self, db: Database, channel: Channel
    ) -> None:
        """50 due rows in batches of 7 all get one invoice in one tick, 4 provider calls at once."""
        await seed.plan(db.pool)
        # Two groups share a period end, so the keyset must break ties by id.
        await seed_due(db.pool, 25, prefix="a")
        await seed_due(db.pool, 25, prefix="b", period_end=PERIOD_END + timedelta(hours=1))
        provider = WrappedProvider(simulated(latency_ms=20))
        store = CountingStore(db)
        scheduler = make_scheduler(
            db, provider, channel, store=store, batch_size=7, provider_concurrency=4
        )

        report = await scheduler.tick(NOW)

        assert (report.candidates, report.claimed, report.created_count) == (50, 50, 50)
        assert store.candidate_limits == [7] * 8  # 7 full batches, then one of 1
        per_subscription = await db.pool.fetch(
            "SELECT subscription_id, count(*) AS n FROM payment_invoices GROUP BY 1"
        )
        assert len(per_subscription) == 50
        assert {row["n"] for row in per_subscription} == {1}
        assert len({request.order_id for request in provider.requests}) == 50
        assert provider.max_in_flight == 4
        assert sum(message.count for message in channel.received()) == 50
        await assert_renewal_invariants(db.pool)

    async def test_two_groups_are_committed_at_once(self, db: Database, channel: Channel) -> None:
        """While one group's commit is in the server, the next group is committed alongside."""
        await seed.plan(db.pool)
        await seed_due(db.pool, 20)
        store = OverlapStore(db)
        scheduler = make_scheduler(db, simulated(), channel, store=store, batch_size=5)

        with anyio.fail_after(10):
            report = await scheduler.tick(NOW)

        assert store.max_in_flight == 2
        assert report.created_count == 20
        await assert_renewal_invariants(db.pool)


def plan_nodes(plan: Any) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, without its children."""
    found = []
    if isinstance(plan, dict):
        if "Node Type" in plan:
            found.append({key: value for key, value in plan.items() if key != "Plans"})
        for value in plan.values():
            found.extend(plan_nodes(value))
    elif isinstance(plan, list):
        for value in plan:
            found.extend(plan_nodes(value))
    return found


class TestCandidateQueryPlan:
    async def test_idle_candidate_query_uses_indexes(self, db: Database) -> None:
        """With 100,000 subscriptions, none due, the candidate query reads the window by index."""
        pool = db.pool
        await seed.plan(pool)
        await pool.execute(
            "INSERT INTO users (id, email)"
            " SELECT 'u' || g, 'u' || g || '@example.com' FROM generate_series(1, 100000) AS g"
        )
        # Half ended in the past, half end a month or more ahead; some expired, some automatic.
        await pool.execute(
            "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
            " activated_at, current_period_start, current_period_end)"
            " SELECT 's' || g, 'u' || g, 'plan_1',"
            "        CASE WHEN g % 10 = 0 THEN 'expired' ELSE 'active' END, g % 7 <> 0,"
            "        e - interval '30 days', e - interval '30 days', e"
            " FROM generate_series(1, 100000) AS g,"
            "      LATERAL (SELECT CASE WHEN g % 2 = 0"
            "                           THEN $1::timestamptz - g * interval '1 minute'"
            "                           ELSE $1::timestamptz + interval '30 days'"
            "                                + g * interval '1 minute' END AS e) AS x",
            NOW,
        )
        await pool.execute(
            "INSERT INTO payment_invoices (id, user_id, subscription_id, provider,"
            " provider_invoice_id, status, currency, amount_crypto, amount_usd, created_at)"
            " SELECT 'seed-' || g, 'u' || g, 's' || g, 'nowpayments', 'p' || g, 'paid', 'USDT',"
            "        29, 29, $1::timestamptz - interval '40 days'"
            " FROM generate_series(1, 100000) AS g",
            NOW,
        )
        await pool.execute("ANALYZE")

        text, *args = bind(
            "renewal_candidates",
            (),
            {
                "now": NOW,
                "window_end": NOW + timedelta(hours=72),
                "after_period_end": datetime.min.replace(tzinfo=UTC),
                "after_id": "",
                "size": 500,
            },
        )
        raw = await pool.fetchval("EXPLAIN (FORMAT JSON) " + text, *args)
        plan = json.loads(raw) if isinstance(raw, str) else raw

        nodes = plan_nodes(plan)
        sequential = [
            node["Relation Name"]
            for node in nodes
            if node["Node Type"] == "Seq Scan"
            and node["Relation Name"] in {"subscriptions", "payment_invoices"}
        ]
        assert sequential == [], json.dumps(plan, indent=1)
        # The due window bounds the index scan: not a walk through a whole index either.
        window_scans = [
            node for node in nodes if "current_period_end" in node.get("Index Cond", "")
        ]
        assert window_scans, json.dumps(plan, indent=1)
        assert (await idle_tick(db)).candidates == 0


async def idle_tick(db: Database) -> Any:
    """One real tick over the seeded data (nothing is due, so nothing is created)."""
    channel = Channel()
    try:
        return await make_scheduler(db, simulated(), channel).tick(NOW)
    finally:
        channel.outbox.sender.close()
        channel.receiver.close()


class TestLogs:
    async def test_each_created_invoice_is_a_debug_event(
        self, db: Database, channel: Channel
    ) -> None:
        """One debug `renewal_invoice_created` per invoice names invoice, subscription and order."""
        await seed.plan(db.pool)
        await seed_due(db.pool, 3)
        with capture_logs() as logs:
            report = await make_scheduler(db, simulated(), channel).tick(NOW)

        created = [entry for entry in logs if entry["event"] == "renewal_invoice_created"]
        stored = {row["id"]: row for row in await automatic_invoices(db.pool)}
        assert report.created_count == 3
        assert {entry["invoice_id"] for entry in created} == set(stored)
        for entry in created:
            invoice = stored[entry["invoice_id"]]
            assert entry["log_level"] == "debug"
            assert entry["subscription_id"] == invoice["subscription_id"]
            assert entry["order_id"] == order_id(invoice["subscription_id"], PERIOD_START)

    async def test_retry_is_a_warning_naming_subscription_and_order(
        self, db: Database, channel: Channel
    ) -> None:
        """A transient failure logs `renewal_invoice_retry_scheduled` at warning with both ids."""
        await worked_example(db)
        with capture_logs() as logs:
            report = await make_scheduler(db, simulated(failure_rate=1.0), channel).tick(NOW)

        [retry] = [entry for entry in logs if entry["event"] == "renewal_invoice_retry_scheduled"]
        assert (report.transient_failures, report.permanent_failures) == (1, 0)
        assert retry["log_level"] == "warning"
        assert (retry["subscription_id"], retry["order_id"]) == (
            "sub_1",
            order_id("sub_1", PERIOD_START),
        )


class TestConcurrentClaims:
    async def test_racing_claims_of_the_same_slots_never_fail(self, db: Database) -> None:
        """Instances claiming the same slots at once each win some, none errs, none wins twice.

        The race it guards (an instance reaching a second unique index on the order id before
        the primary key, and failing instead of taking the ON CONFLICT path) was seen under load
        in the three-instance system test; here it needs a scheduler's bad luck to show.
        """
        await seed.plan(db.pool)
        slots = []
        for number in range(150):
            await seed.subscription(
                db.pool, f"s{number}", period_start=NOW, period_end=NOW + timedelta(days=2)
            )
            slots.append((f"s{number}", NOW, order_id(f"s{number}", NOW)))
        store = RenewalStore(db)
        won: list[str] = []

        async def claim(instance: int) -> None:
            for _ in range(3):
                claimed = await store.claim(
                    slots,
                    holder=f"i{instance}",
                    token=f"t{instance}",
                    now=NOW,
                    lease_until=NOW + timedelta(minutes=5),
                )
                won.extend(slot.subscription_id for slot in claimed)

        async with anyio.create_task_group() as group:
            for instance in range(8):
                group.start_soon(claim, instance)

        assert sorted(won) == sorted(slot[0] for slot in slots)

    async def test_order_id_has_no_unique_index_of_its_own(self, db: Database) -> None:
        """Only the primary key arbitrates claims: no other unique index on the claims table."""
        unique = await db.pool.fetch(
            "SELECT indexrelid::regclass::text AS name FROM pg_index"
            " WHERE indrelid = 'nproxyd_renewal_claims'::regclass AND indisunique"
            " AND NOT indisprimary"
        )
        assert [row["name"] for row in unique] == ["nproxyd_renewal_claims_invoice_id_key"]
