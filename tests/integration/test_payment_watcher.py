"""The payment watcher against a real PostgreSQL: schedule, ordering, awaiting list, mail."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import aiohttp
import anyio
import pytest
from structlog.testing import capture_logs

from nproxyd.actors.payment_watcher import (
    PaymentWatcher,
    PaymentWatcherPorts,
    PaymentWatcherSettings,
)
from nproxyd.adapters.nowpayments_status import NowPaymentsIpnVerifier, NowPaymentsStatus
from nproxyd.adapters.status_simulated import SimulatedPaymentStatus
from nproxyd.core.config import HealthConfig, NowPaymentsConfig, SimulatedPaymentConfig
from nproxyd.core.messages import PaymentWatcherReport
from nproxyd.core.payments import CheckResult, PaymentRef, ProviderPayment, RecordContext
from nproxyd.core.ports import PaymentStatusSource
from nproxyd.runtime.actor import ActorLoop, TickOutcome
from nproxyd.runtime.metrics import Metrics
from nproxyd.runtime.ops import Monitor, OpsQueries
from nproxyd.runtime.supervisor import Supervisor
from nproxyd.store.database import Database
from nproxyd.store.payments import PaymentStore
from tests import seed
from tests.fakes.clock import FakeClock
from tests.fakes.nowpayments import FakeNowPayments, Mode, ipn_body, ipn_signature, status_answer

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
SECRET = "ipn-secret-for-tests"
OPERATOR = "ops@example.com"
FAR_FUTURE = "9999-12-31T00:00:00.000Z"


def settings(**overrides: Any) -> PaymentWatcherSettings:
    values: dict[str, Any] = {
        "interval_seconds": 60.0,
        "min_check_seconds": 60.0,
        "max_check_seconds": 1800.0,
        "grace_hours": 72.0,
        "payment_provider": "nowpayments",
        "provider_concurrency": 4,
        "operator_email": "",
        "from_address": "billing@nproxy.example",
        "batch_size": 50,
        "lease_seconds": 300.0,
    }
    return PaymentWatcherSettings(**{**values, **overrides})


def watcher(
    db: Database, source: PaymentStatusSource, *, verifier: bool = False, **overrides: Any
) -> PaymentWatcher:
    ports = PaymentWatcherPorts(
        store=PaymentStore(db),
        source=source,
        verifier=NowPaymentsIpnVerifier(SECRET) if verifier else None,
    )
    return PaymentWatcher(settings(**overrides), ports, FakeClock(T0))


async def add_invoice(
    db: Database,
    invoice_id: str,
    *,
    status: str = "pending",
    created_at: datetime = T0,
    updated_at: datetime | None = None,
    provider: str = "nowpayments",
    payment_id: str | None = None,
) -> str:
    user = await seed.user(db.pool, f"user_{invoice_id}")
    await db.pool.execute(
        "INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
        " currency, amount_crypto, amount_usd, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, 'USDT', 29, 29, $6::timestamptz,"
        " coalesce($7::timestamptz, $6::timestamptz))",
        invoice_id,
        user,
        provider,
        payment_id or invoice_id,
        status,
        created_at,
        updated_at,
    )
    return invoice_id


async def watch_row(db: Database, invoice_id: str) -> Any:
    return await db.pool.fetchrow(
        "SELECT * FROM nproxyd_invoice_payments WHERE invoice_id = $1", invoice_id
    )


async def history(db: Database, invoice_id: str) -> list[tuple[Any, ...]]:
    rows = await db.pool.fetch(
        "SELECT from_status, to_status, source FROM nproxyd_invoice_payment_history"
        " WHERE invoice_id = $1 ORDER BY at, id",
        invoice_id,
    )
    return [tuple(row.values()) for row in rows]


async def shared_snapshot(db: Database) -> list[Any]:
    invoices = await db.pool.fetch("SELECT * FROM payment_invoices ORDER BY id")
    subscriptions = await db.pool.fetch("SELECT * FROM subscriptions ORDER BY id")
    return [dict(row) for row in [*invoices, *subscriptions]]


def simulated(paid_after: float = 300.0, partial: float = 0.0) -> SimulatedPaymentStatus:
    return SimulatedPaymentStatus(
        SimulatedPaymentConfig(paid_after_seconds=paid_after, partial_fraction=partial)
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeNowPayments]:
    async with FakeNowPayments(hang_seconds=2.0) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def nowpayments(fake: FakeNowPayments, session: aiohttp.ClientSession) -> NowPaymentsStatus:
    config = NowPaymentsConfig(api_base_url=fake.url, api_key=fake.api_key, timeout_seconds=0.5)
    return NowPaymentsStatus(config, session=lambda: session)


class TestSchedule:
    async def test_invoice_is_followed_until_the_provider_reports_a_final_status(
        self, db: Database
    ) -> None:
        """Checked at once, then only when due; after `finished` it is never checked again."""
        await add_invoice(db, "inv1")
        actor = watcher(db, simulated(paid_after=300))

        first = await actor.tick(T0)
        early = await actor.tick(T0 + timedelta(seconds=30))
        due = await actor.tick(T0 + timedelta(seconds=60))
        paid = await actor.tick(T0 + timedelta(hours=2))
        after = await actor.tick(T0 + timedelta(days=1))

        assert (first.discovered, first.checked, first.status_changes) == (1, 1, {"waiting": 1})
        assert early.checked == 0
        assert due.checked == 1
        assert paid.status_changes == {"finished": 1}
        assert after.checked == 0
        row = await watch_row(db, "inv1")
        assert row["provider_status"] == "finished"
        assert row["next_check_at"] is None
        assert row["actually_paid"] == Decimal(29)
        assert await history(db, "inv1") == [
            (None, "waiting", "poll"),
            ("waiting", "finished", "poll"),
        ]

    async def test_quiet_invoices_are_checked_less_often_up_to_the_maximum(
        self, db: Database
    ) -> None:
        """While the status stays the same, the wait doubles from 60 s and stops at 1800 s."""
        await add_invoice(db, "slow")
        actor = watcher(db, simulated(paid_after=10**6))
        now = T0
        waits = []
        for _ in range(8):
            await actor.tick(now)
            next_check = (await watch_row(db, "slow"))["next_check_at"]
            waits.append((next_check - now).total_seconds())
            now = next_check
        assert waits == [60, 120, 240, 480, 960, 1800, 1800, 1800]

    async def test_ended_invoices_are_followed_only_within_the_grace(self, db: Database) -> None:
        """Expired/canceled less than grace_hours ago are checked; older and paid ones never."""
        await add_invoice(db, "recent", status="expired", updated_at=T0 - timedelta(hours=1))
        await add_invoice(db, "canceled", status="canceled", updated_at=T0 - timedelta(hours=71))
        await add_invoice(db, "old", status="expired", updated_at=T0 - timedelta(hours=73))
        await add_invoice(db, "paid", status="paid")
        await add_invoice(db, "other", provider="simulated")
        actor = watcher(db, simulated(paid_after=10**6))

        report = await actor.tick(T0)

        assert report.checked == 2
        tracked = await db.pool.fetch("SELECT invoice_id FROM nproxyd_invoice_payments")
        assert sorted(row["invoice_id"] for row in tracked) == ["canceled", "recent"]

    async def test_grace_passing_or_activation_retires_an_invoice(self, db: Database) -> None:
        """A followed invoice whose grace passed, or that the admin set paid, is not checked."""
        await add_invoice(db, "ending", status="expired", updated_at=T0 - timedelta(hours=71))
        await add_invoice(db, "activated")
        actor = watcher(db, simulated(paid_after=10**6))
        await actor.tick(T0)
        await db.pool.execute("UPDATE payment_invoices SET status = 'paid' WHERE id = 'activated'")

        report = await actor.tick(T0 + timedelta(hours=2))

        assert (report.checked, report.retired) == (0, 2)
        assert (await watch_row(db, "ending"))["next_check_at"] is None
        assert (await watch_row(db, "activated"))["next_check_at"] is None

    async def test_the_watcher_never_writes_invoices_or_subscriptions(self, db: Database) -> None:
        """Invariant 9: payment_invoices and subscriptions are byte-for-byte unchanged."""
        await seed.plan(db.pool)
        await seed.subscription(db.pool, "s1", period_start=T0, period_end=T0 + timedelta(30))
        await add_invoice(db, "paid_at_provider")
        await add_invoice(db, "partly", payment_id="partly")
        before = await shared_snapshot(db)
        actor = watcher(db, simulated(paid_after=0, partial=0.5), operator_email=OPERATOR)

        await actor.tick(T0 + timedelta(hours=1))

        assert await shared_snapshot(db) == before
        statuses = await db.pool.fetch("SELECT provider_status FROM nproxyd_invoice_payments")
        assert {row["provider_status"] for row in statuses} <= {"finished", "partially_paid"}


class TestInstances:
    async def test_batches_are_paged_inside_the_store_until_nothing_is_due(
        self, db: Database
    ) -> None:
        """With batch_size 3, one tick checks all 10 due invoices, each once."""
        for number in range(10):
            await add_invoice(db, f"page{number}")
        actor = watcher(db, simulated(paid_after=10**6), batch_size=3)

        report = await actor.tick(T0)

        assert report.checked == 10
        rows = await db.pool.fetch("SELECT attempts FROM nproxyd_invoice_payments")
        assert [row["attempts"] for row in rows] == [1] * 10

    async def test_two_instances_never_check_one_invoice_twice_in_a_round(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """Concurrent ticks of two watchers split the due invoices: one request per invoice."""
        ids = [str(5100 + number) for number in range(30)]
        for payment_id in ids:
            await add_invoice(db, payment_id)
            fake.script_status(payment_id, status_answer(payment_id, "waiting", T0))
        first = watcher(db, nowpayments(fake, session), batch_size=5)
        second = watcher(db, nowpayments(fake, session), batch_size=5)
        reports = []

        async def tick(actor: PaymentWatcher) -> None:
            reports.append(await actor.tick(T0))

        async with anyio.create_task_group() as group:
            group.start_soon(tick, first)
            group.start_soon(tick, second)

        assert [fake.status_calls(payment_id) for payment_id in ids] == [1] * 30
        assert sum(report.checked for report in reports) == 30

    async def test_a_batch_claimed_late_in_a_long_tick_gets_a_whole_lease(
        self, db: Database
    ) -> None:
        """Leases add the time the tick has spent: the second batch is leased 200 s later."""
        clock = FakeClock(T0)
        leases: list[float] = []

        class SlowSource:
            """Takes 200 s per answer and notes the lease its invoice holds meanwhile."""

            name = "slow"

            async def payment_status(self, ref: PaymentRef, now: datetime) -> ProviderPayment:
                row = await watch_row(db, ref.provider_payment_id)
                leases.append((row["next_check_at"] - T0).total_seconds())
                await clock.advance(200)
                return ProviderPayment(payment_id=ref.provider_payment_id, status="waiting")

        await add_invoice(db, "slow1")
        await add_invoice(db, "slow2")
        ports = PaymentWatcherPorts(store=PaymentStore(db), source=SlowSource())
        actor = PaymentWatcher(settings(batch_size=1), ports, clock)

        await actor.tick(T0)

        assert leases == [300, 500]


async def only_6001_invalid(db: Database, report: PaymentWatcherReport) -> Any:
    """Asserts that of payments 6000-6002 (all finished) only 6001 was invalid; its row."""
    assert report.checks == {"ok": 2, "invalid": 1}
    for payment_id in ("6000", "6002"):
        assert (await watch_row(db, payment_id))["provider_status"] == "finished"
    row = await watch_row(db, "6001")
    assert row["provider_status"] is None and row["last_outcome"] == "invalid"
    return row


class TestAnswers:
    async def test_an_older_answer_never_replaces_a_newer_one(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A poll answer with an older updated_at than the stored one leaves the status alone."""
        await add_invoice(db, "5001")
        fake.script_status(
            "5001",
            status_answer("5001", "confirming", T0 + timedelta(minutes=10)),
            status_answer("5001", "waiting", T0 + timedelta(minutes=5)),
        )
        actor = watcher(db, nowpayments(fake, session))

        await actor.tick(T0)
        stale = await actor.tick(T0 + timedelta(hours=1))

        row = await watch_row(db, "5001")
        assert stale.checked == 1 and stale.status_changes == {}
        assert row["provider_status"] == "confirming"
        assert row["provider_updated_at"] == T0 + timedelta(minutes=10)
        assert await history(db, "5001") == [(None, "confirming", "poll")]

    async def test_a_bad_answer_fails_only_its_own_invoice(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """NUL text, bad number, bad date or bad JSON: that invoice errs, the rest is recorded."""
        good = status_answer("6000", "finished", T0)
        answers: dict[str, dict[str, Any] | Mode] = {
            "6000": good,
            "6001": {**good, "payment_id": 6001, "payment_status": "fini\x00shed"},
            "6002": {**good, "payment_id": 6002, "actually_paid": "lots"},
            "6003": {**good, "payment_id": 6003, "updated_at": "yesterday"},
            "6004": Mode.MALFORMED_JSON,
        }
        for payment_id, answer in answers.items():
            await add_invoice(db, payment_id)
            fake.script_status(payment_id, answer)
        actor = watcher(db, nowpayments(fake, session))

        report = await actor.tick(T0)

        assert report.checks == {"ok": 1, "invalid": 4}
        assert (await watch_row(db, "6000"))["provider_status"] == "finished"
        for payment_id in ("6001", "6002", "6003", "6004"):
            row = await watch_row(db, payment_id)
            assert row["provider_status"] is None
            assert row["last_outcome"] == "invalid"
            assert row["next_check_at"] == T0 + timedelta(seconds=120)

    async def test_an_answer_about_another_payment_is_invalid_for_the_invoice_that_asked(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A poll answer whose payment_id is another payment's records nothing for the asker."""
        await add_invoice(db, "5401")
        await add_invoice(db, "5402")
        fake.script_status("5401", status_answer("5402", "finished", T0))
        fake.script_status("5402", status_answer("5402", "waiting", T0))
        actor = watcher(db, nowpayments(fake, session))

        report = await actor.tick(T0)

        assert report.checks == {"ok": 1, "invalid": 1}
        row = await watch_row(db, "5401")
        assert row["provider_status"] is None and row["last_outcome"] == "invalid"
        assert row["provider_payment_id"] == "5401" and "payment_id" in row["last_error"]
        assert await history(db, "5401") == []
        assert (await watch_row(db, "5402"))["provider_status"] == "waiting"

    async def test_an_answer_dated_far_in_the_future_is_invalid_and_does_not_freeze(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """updated_at 9999-12-31 is invalid (nothing recorded); later answers still are."""
        await add_invoice(db, "5601")
        fake.script_status(
            "5601",
            {**status_answer("5601", "waiting", T0), "updated_at": FAR_FUTURE},
            status_answer("5601", "confirming", T0 + timedelta(minutes=30)),
        )
        actor = watcher(db, nowpayments(fake, session))

        first = await actor.tick(T0)
        row = await watch_row(db, "5601")
        second = await actor.tick(T0 + timedelta(hours=1))

        assert first.checks == {"invalid": 1}
        assert row["provider_status"] is None and "updated_at" in row["last_error"]
        assert second.status_changes == {"confirming": 1}
        assert await history(db, "5601") == [(None, "confirming", "poll")]

    async def test_an_answer_dated_within_the_hour_ahead_is_recorded(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A provider clock up to 1 h ahead is skew, not an invalid answer."""
        await add_invoice(db, "5602")
        ahead = T0 + timedelta(minutes=59)
        fake.script_status("5602", status_answer("5602", "waiting", ahead))
        actor = watcher(db, nowpayments(fake, session))

        report = await actor.tick(T0)

        assert report.checks == {"ok": 1}
        assert (await watch_row(db, "5602"))["provider_updated_at"] == ahead

    async def test_recording_an_answer_never_changes_the_followed_payment_id(
        self, db: Database
    ) -> None:
        """Even an answer naming another payment id leaves provider_payment_id as followed."""
        await add_invoice(db, "5501", payment_id="pay-5501")
        store = PaymentStore(db)
        await store.discover("nowpayments", T0, 72.0)
        other = ProviderPayment(payment_id="pay-9999", status="finished", updated_at=T0)
        result = CheckResult(invoice_id="5501", outcome="ok", payment=other)

        await store.record([result], RecordContext(now=T0, source="ipn"))

        row = await watch_row(db, "5501")
        assert row["provider_status"] == "finished"
        assert row["provider_payment_id"] == "pay-5501"

    @pytest.mark.parametrize(
        "amount",
        [Decimal("1E-20000"), Decimal("0." + "1" * 17_000), Decimal("0E+300000")],
        ids=["tiny-exponent", "17000-decimals", "zero-huge-exponent"],
    )
    async def test_an_amount_the_database_cannot_hold_fails_only_its_own_invoice(
        self,
        db: Database,
        fake: FakeNowPayments,
        session: aiohttp.ClientSession,
        amount: Decimal,
    ) -> None:
        """A finite amount numeric cannot hold is invalid for its invoice; the batch is recorded."""
        good = status_answer("6000", "finished", T0)
        for payment_id, answer in (
            ("6000", good),
            ("6001", {**good, "payment_id": 6001, "actually_paid": amount}),
            ("6002", {**good, "payment_id": 6002}),
        ):
            await add_invoice(db, payment_id)
            fake.script_status(payment_id, answer)
        actor = watcher(db, nowpayments(fake, session))

        row = await only_6001_invalid(db, await actor.tick(T0))

        assert "actually_paid" in row["last_error"]

    @pytest.mark.parametrize("mode", [Mode.DEEP_JSON, Mode.HUGE_BODY], ids=lambda m: m.value)
    async def test_a_deeply_nested_or_huge_answer_fails_only_its_own_invoice(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession, mode: Mode
    ) -> None:
        """JSON nested too deep to decode, or over 1 MiB, is invalid; the batch is recorded."""
        for payment_id in ("6000", "6001", "6002"):
            await add_invoice(db, payment_id)
            fake.script_status(payment_id, status_answer(payment_id, "finished", T0))
        fake.script_status("6001", mode)
        actor = watcher(db, nowpayments(fake, session))

        await only_6001_invalid(db, await actor.tick(T0))

    async def test_refused_checks_wait_for_the_slow_cadence(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """404 and 403 are counted (permanent, unauthorized), logged, and retried after 1800 s."""
        await add_invoice(db, "7001")
        await add_invoice(db, "7002")
        fake.script_status("7002", Mode.FORBIDDEN)
        actor = watcher(db, nowpayments(fake, session))

        with capture_logs() as logs:
            report = await actor.tick(T0)

        assert report.checks == {"permanent": 1, "unauthorized": 1}
        refused = {e["invoice_id"] for e in logs if e["event"] == "payment_check_refused"}
        assert refused == {"7001", "7002"}
        row = await watch_row(db, "7001")
        assert row["next_check_at"] == T0 + timedelta(seconds=1800)
        assert row["attempts"] == 1 and "404" in row["last_error"]

    async def test_rate_limit_holds_back_the_rest_of_the_tick(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """After a 429 no further call is made this tick; every check waits for Retry-After."""
        for number in range(3):
            await add_invoice(db, f"800{number}")
            fake.script_status(f"800{number}", Mode.RATE_LIMITED)
        actor = watcher(db, nowpayments(fake, session), provider_concurrency=1)

        report = await actor.tick(T0)

        assert report.checks == {"rate_limited": 3}
        assert sum(fake.status_calls(f"800{n}") for n in range(3)) == 1
        row = await watch_row(db, "8002")
        assert row["next_check_at"] == T0 + timedelta(seconds=60)

    async def test_unknown_status_is_recorded_as_is_and_logged(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A status the provider invented is stored and logged, never a crash."""
        await add_invoice(db, "9001")
        fake.script_status("9001", status_answer("9001", "on_hold", T0))
        actor = watcher(db, nowpayments(fake, session))

        with capture_logs() as logs:
            report = await actor.tick(T0)

        assert report.status_changes == {"on_hold": 1}
        assert (await watch_row(db, "9001"))["provider_status"] == "on_hold"
        assert any(e["event"] == "payment_status_unknown" for e in logs)

    async def test_a_programming_error_fails_the_tick(self, db: Database) -> None:
        """Only the provider error family is a check failure; a TypeError fails the tick."""

        class BrokenSource:
            name = "broken"

            async def payment_status(self, ref: PaymentRef, now: datetime) -> ProviderPayment:
                raise TypeError("a bug")

        await add_invoice(db, "bug")
        actor = watcher(db, BrokenSource())

        # The tick's task group may wrap it: a group holding only the TypeError is accepted.
        with pytest.RaisesGroup(
            pytest.RaisesExc(TypeError, match="a bug"), allow_unwrapped=True, flatten_subgroups=True
        ):
            await actor.tick(T0)


UNREPRESENTABLE = ["10000-01-01 00:00+00", "0001-01-01 00:00+00 BC", "infinity", "-infinity"]


async def set_created_at(db: Database, invoice_id: str, value: str) -> None:
    """Give an invoice a creation time as the web API could store it (any timestamptz)."""
    await db.pool.execute(
        "UPDATE payment_invoices SET created_at = $2::text::timestamptz WHERE id = $1",
        invoice_id,
        value,
    )


class TestUnrepresentableCreationTimes:
    @pytest.mark.parametrize("created_at", UNREPRESENTABLE)
    async def test_polling_records_the_whole_batch(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession, created_at: str
    ) -> None:
        """An invoice created at a time Python cannot hold is checked like the rest of its batch."""
        for payment_id in ("6000", "6001", "6002"):
            await add_invoice(db, payment_id)
            fake.script_status(payment_id, status_answer(payment_id, "finished", T0))
        await set_created_at(db, "6001", created_at)
        actor = watcher(db, nowpayments(fake, session), operator_email=OPERATOR)

        report = await actor.tick(T0)

        assert report.checks == {"ok": 3}
        for payment_id in ("6000", "6001", "6002"):
            assert (await watch_row(db, payment_id))["provider_status"] == "finished"

    @pytest.mark.parametrize("created_at", UNREPRESENTABLE)
    async def test_the_simulated_provider_fails_only_that_invoice(
        self, db: Database, created_at: str
    ) -> None:
        """The simulated story needs the creation time: without one, only that check fails."""
        for invoice_id in ("6000", "6001", "6002"):
            await add_invoice(db, invoice_id)
        await set_created_at(db, "6001", created_at)
        actor = watcher(db, simulated(paid_after=0))

        report = await actor.tick(T0)

        assert report.checks == {"ok": 2, "permanent": 1}
        assert (await watch_row(db, "6001"))["last_outcome"] == "permanent"
        assert (await watch_row(db, "6002"))["provider_status"] == "finished"

    async def test_a_notification_is_recorded(self, db: Database) -> None:
        """A signed notification for such an invoice is recorded, not failed on every retry."""
        await add_invoice(db, "6001")
        await set_created_at(db, "6001", UNREPRESENTABLE[0])
        actor = watcher(db, simulated(), verifier=True)

        outcome = await actor.receive_ipn(*signed(status_answer("6001", "finished", T0)))

        assert outcome.outcome == "ok"
        assert (await watch_row(db, "6001"))["provider_status"] == "finished"


class TestAwaitingAndMail:
    async def test_awaiting_lists_paid_invoices_until_the_admin_activates(
        self, db: Database
    ) -> None:
        """Finished and partially paid invoices not yet paid are listed, oldest first."""
        await seed.plan(db.pool)
        await seed.subscription(db.pool, "s1", period_start=T0, period_end=T0 + timedelta(30))
        await db.pool.execute(
            "INSERT INTO payment_invoices (id, user_id, subscription_id, provider,"
            " provider_invoice_id, status, currency, amount_crypto, amount_usd, created_at)"
            " VALUES ('withsub', 'user_s1', 's1', 'nowpayments', 'withsub', 'pending', 'USDT',"
            " 29, 29, $1)",
            T0,
        )
        await add_invoice(db, "waits")
        store = PaymentStore(db)
        actor = watcher(db, simulated(paid_after=0))
        await actor.tick(T0 + timedelta(minutes=1))

        awaiting = await store.awaiting()
        await db.pool.execute("UPDATE payment_invoices SET status = 'paid' WHERE id = 'withsub'")
        report = await actor.tick(T0 + timedelta(minutes=2))

        assert [(row.invoice_id, row.provider_status) for row in awaiting] == [
            ("waits", "finished"),
            ("withsub", "finished"),
        ]
        assert awaiting[1].plan_code == "plan_1" and awaiting[1].user_email == "user_s1@example.com"
        assert (report.settled, report.awaiting_count) == (1, 1)
        assert [row.invoice_id for row in await store.awaiting()] == ["waits"]

    async def test_operator_is_mailed_once_per_invoice_and_status(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """partially_paid then finished: two mails; the same status again (IPN, poll): none."""
        await add_invoice(db, "4242")
        partial = status_answer("4242", "partially_paid", T0, actually_paid=10)
        finished = status_answer("4242", "finished", T0 + timedelta(minutes=5))
        fake.script_status("4242", partial, finished)
        actor = watcher(db, nowpayments(fake, session), verifier=True, operator_email=OPERATOR)

        await actor.tick(T0)
        await actor.receive_ipn(*signed(partial))
        await actor.tick(T0 + timedelta(hours=1))
        replay = await actor.receive_ipn(*signed(finished))

        mails = await db.pool.fetch(
            "SELECT to_address, subject, body, dedupe_key FROM mail_outbox ORDER BY created_at"
        )
        assert [m["dedupe_key"] for m in mails] == [
            "payment-status:4242:partially_paid",
            "payment-status:4242:finished",
        ]
        assert all(m["to_address"] == OPERATOR for m in mails)
        assert "user_4242@example.com" in mails[1]["body"] and "4242" in mails[1]["subject"]
        assert "Paid: 10 usdttrc20" in mails[0]["body"]
        assert replay.change is None

    async def test_no_operator_mail_for_an_invoice_already_paid(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A notification that an invoice the admin already set paid is finished is recorded,
        but asks the operator for nothing: no mail."""
        await add_invoice(db, "4343")
        await db.pool.execute("UPDATE payment_invoices SET status = 'paid' WHERE id = '4343'")
        actor = watcher(db, nowpayments(fake, session), verifier=True, operator_email=OPERATOR)

        result = await actor.receive_ipn(*signed(status_answer("4343", "finished", T0)))

        assert result.change is not None and result.change.to_status == "finished"
        assert await db.pool.fetchval("SELECT count(*) FROM mail_outbox") == 0


def signed(answer: dict[str, Any]) -> tuple[bytes, str]:
    body = ipn_body(answer)
    return json.dumps(body).encode(), ipn_signature(body, SECRET)


def readiness(actor: PaymentWatcher) -> OpsQueries:
    """The daemon's readiness judge, on the actor's clock, for this one actor."""
    clock = cast(FakeClock, actor.clock)
    monitor = Monitor(clock, Metrics([actor.name]))
    state = OpsQueries(
        clock=clock,
        instance_id="test",
        loops={actor.name: ActorLoop(actor, clock, monitor)},
        supervisor=Supervisor(clock, max_restarts=5, restart_window_seconds=60),
        monitor=monitor,
        health=cast(Any, None),
        keys=cast(Any, None),
        channel=cast(Any, None),
        settings=HealthConfig(provider_failing_seconds=1800),
        retry_windows={actor.name: 1860.0},
    )
    state.snapshot = None
    return state


async def judged_tick(actor: PaymentWatcher, state: OpsQueries) -> PaymentWatcherReport:
    """One tick at the clock's time, its outcome handed to the readiness judge as the loop does."""
    clock = actor.clock
    state.monitor.tick_started(actor.name)
    report = await actor.tick(clock.now())
    state.monitor.tick_finished(
        TickOutcome(
            actor=actor.name,
            started_at=clock.now(),
            duration_seconds=0.1,
            ok=True,
            report=report,
            degraded=report.degraded(),
        )
    )
    return report


def failing_reasons(state: OpsQueries) -> list[tuple[str, str | None, str]]:
    return [
        (reason.reason, reason.actor, reason.detail)
        for reason in state.reasons()
        if reason.reason == "provider_failing"
    ]


async def two_judged_ticks(
    db: Database,
    fake: FakeNowPayments,
    session: aiohttp.ClientSession,
    mode: Mode,
    payment_ids: tuple[str, ...],
) -> tuple[PaymentWatcherReport, PaymentWatcherReport, OpsQueries]:
    """Invoices whose checks the stand-in answers with ``mode``; two ticks 1800 s apart, each
    judged for readiness; returns both reports and the readiness state."""
    for payment_id in payment_ids:
        await add_invoice(db, payment_id)
        fake.script_status(payment_id, mode)
    actor = watcher(db, nowpayments(fake, session))
    state = readiness(actor)
    first = await judged_tick(actor, state)
    await cast(FakeClock, actor.clock).advance(1800)
    return first, await judged_tick(actor, state), state


class TestHealth:
    async def test_every_check_failing_with_5xx_is_degraded_and_turns_readiness_red(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """Every check answered 500: degraded ticks, and after 1800 s provider_failing."""
        first, second, state = await two_judged_ticks(
            db, fake, session, Mode.SERVER_ERROR, ("5101", "5102")
        )

        assert first.checks == {"transient": 2} and second.checks == {"transient": 2}
        assert first.degraded() is not None
        assert "all 2 payment status checks failed" in (second.degraded() or "")
        ((code, name, detail),) = failing_reasons(state)
        assert (code, name) == ("provider_failing", PaymentWatcher.name)
        assert "2 transient" in detail

    async def test_a_refused_api_key_is_degraded(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A 401 or 403 refuses the key, failing every check: counted unauthorized, degraded."""
        await add_invoice(db, "5201")
        await add_invoice(db, "5202")
        fake.script_status("5201", Mode.UNAUTHORIZED)
        fake.script_status("5202", Mode.FORBIDDEN)
        actor = watcher(db, nowpayments(fake, session))

        report = await actor.tick(T0)

        assert report.checks == {"unauthorized": 2}
        assert report.degraded() is not None
        row = await watch_row(db, "5201")
        assert row["last_outcome"] == "unauthorized" and "API key" in row["last_error"]
        assert row["next_check_at"] == T0 + timedelta(seconds=1800)

    async def test_payments_the_provider_does_not_know_are_not_degraded(
        self, db: Database, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """Every check answered 404 fails only those invoices: never degraded, never not ready."""
        first, second, state = await two_judged_ticks(
            db, fake, session, Mode.NOT_FOUND, ("5301", "5302")
        )

        assert first.checks == {"permanent": 2} and second.checks == {"permanent": 2}
        assert first.degraded() is None and second.degraded() is None
        assert failing_reasons(state) == []


HOSTILE = "usdt\x1b[2J\x1b]0;owned\x07\x9b31m\u202e"


class TestOperatorOutput:
    async def test_control_characters_from_the_provider_are_printed_escaped(
        self, db: Database, dsn: str, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """ESC, BEL, CSI and bidi overrides in status texts reach no terminal raw via the CLI."""
        await add_invoice(db, "5701")
        await add_invoice(db, "5702")
        fake.script_status("5701", status_answer("5701", "finished", T0, pay_currency=HOSTILE))
        fake.script_status("5702", status_answer("5702", f"on_hold{HOSTILE}", T0))
        await watcher(db, nowpayments(fake, session)).tick(T0)
        assert (await watch_row(db, "5701"))["pay_currency"] == HOSTILE  # stored as answered

        outputs = [
            await nproxyd_cli(dsn, "payments", "show", "5701"),
            await nproxyd_cli(dsn, "payments", "show", "5702"),
            await nproxyd_cli(dsn, "payments", "awaiting"),
            await nproxyd_cli(dsn, "payments", "awaiting", "--json"),
        ]

        for text in outputs:
            assert not any(char in text for char in "\x1b\x07\x9b\u202e"), text
        assert "usdt\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202e" in outputs[0]
        assert "on_holdusdt\\x1b[2J" in outputs[1]
        (listed,) = [json.loads(line) for line in outputs[3].splitlines()]
        assert listed["pay_currency"] == HOSTILE


async def nproxyd_cli(dsn: str, *args: str) -> str:
    """Run the real ``nproxyd`` command on ``dsn``; its standard output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPROXYD_")}
    env["NPROXYD__DATABASE__DSN"] = dsn
    env["NPROXYD__DATABASE__AUTO_MIGRATE"] = "false"
    result = await anyio.run_process([sys.executable, "-m", "nproxyd", *args], env=env, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode("utf-8")
