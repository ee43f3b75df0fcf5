"""One bad row or answer never stalls, duplicates or wedges a renewal batch (real PostgreSQL).

Subscriptions whose timestamps Python cannot represent, provider answers with a NUL, invalid
UTF-8, no id or a bad amount, statements that fail on one slot's data, and recipients nproxyd
can never deliver to: each is skipped or quarantined with its reason and logged by id, while
every good subscription of the batch is invoiced exactly once with one mail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from nproxyd.core.errors import StoreDataError
from nproxyd.core.ports import InvoiceRequest, PaymentProvider, ProviderInvoice
from nproxyd.core.rules import order_id
from nproxyd.core.text import is_storable
from nproxyd.store.database import Database
from tests import seed
from tests.fakes.nowpayments import FakeNowPayments, Mode
from tests.integration.test_renewal_scheduler import (
    WrappedProvider,
    claims,
    count,
    make_scheduler,
    nowpayments,
    simulated,
)
from tests.renewal_checks import (
    NOW,
    PERIOD_END,
    PERIOD_START,
    Channel,
    assert_renewal_invariants,
    automatic_invoices,
)

pytestmark = pytest.mark.anyio

# Timestamps PostgreSQL stores and Python's datetime cannot hold.
OUT_OF_RANGE = {
    "minus_infinity": "-infinity",
    "plus_infinity": "infinity",
    "before_christ": "0001-01-01 00:00:00+00 BC",
    "year_10000": "10000-01-01 00:00:00+00",
}


async def seed_good(db: Database, count_: int, *, end: datetime = PERIOD_END) -> list[str]:
    ids = []
    for number in range(1, count_ + 1):
        ids.append(
            await seed.subscription(
                db.pool, f"good_{number}", period_start=PERIOD_START, period_end=end
            )
        )
    return ids


async def seed_raw_timestamp(
    db: Database, sub_id: str, column: str, value: str, *, end: datetime = PERIOD_END
) -> None:
    """A due subscription whose ``column`` holds ``value`` (a PostgreSQL literal)."""
    await seed.subscription(db.pool, sub_id, period_start=PERIOD_START, period_end=end)
    await db.pool.execute(
        f"UPDATE subscriptions SET {column} = $2::text::timestamptz WHERE id = $1",
        sub_id,
        value,
    )


async def invoiced_once(db: Database) -> dict[str, int]:
    per: dict[str, int] = {}
    for row in await automatic_invoices(db.pool):
        per[row["subscription_id"]] = per.get(row["subscription_id"], 0) + 1
    return per


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


class TestUnrepresentableTimestamps:
    @pytest.mark.parametrize("literal", sorted(OUT_OF_RANGE))
    async def test_bad_cycle_start_is_skipped_and_the_batch_proceeds(
        self, db: Database, channel: Channel, literal: str
    ) -> None:
        """A cycle start Python cannot hold is skipped by id; the good rows get one invoice."""
        await seed.plan(db.pool)
        good = await seed_good(db, 3, end=PERIOD_END + timedelta(hours=1))
        await seed_raw_timestamp(db, "poison", "current_period_start", OUT_OF_RANGE[literal])

        with capture_logs() as logs:
            report = await make_scheduler(db, simulated(), channel).tick(NOW)

        assert (report.created_count, report.skipped_bad) == (3, 1)
        reason = "current_period_start is not a representable timestamp"
        assert report.skipped_reasons == {reason: 1}
        skipped = events(logs, "renewal_candidate_skipped")
        assert [(e["subscription_id"], e["reason"]) for e in skipped] == [("poison", reason)]
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        assert await count(db, "mail_outbox") == 3
        assert "poison" not in {row["subscription_id"] for row in await claims(db)}
        await assert_renewal_invariants(db.pool)

    @pytest.mark.parametrize(
        ("column", "literal"),
        [("activated_at", "-infinity"), ("created_at", "10000-06-01 00:00:00+00")],
    )
    async def test_fallback_column_is_named(
        self, db: Database, channel: Channel, column: str, literal: str
    ) -> None:
        """Without current_period_start, the bad activated_at or created_at is the one named."""
        await seed.plan(db.pool)
        good = await seed_good(db, 2)
        await seed_raw_timestamp(db, "poison", column, literal)
        nulls = ["current_period_start"] + (["activated_at"] if column == "created_at" else [])
        for name in nulls:
            await db.pool.execute(f"UPDATE subscriptions SET {name} = NULL WHERE id = 'poison'")

        with capture_logs() as logs:
            report = await make_scheduler(db, simulated(), channel).tick(NOW)

        reason = f"{column} is not a representable timestamp"
        assert report.skipped_reasons == {reason: 1}
        skipped = events(logs, "renewal_candidate_skipped")
        assert [(e["subscription_id"], e["reason"]) for e in skipped] == [("poison", reason)]
        assert await invoiced_once(db) == dict.fromkeys(good, 1)

    async def test_full_batches_of_bad_rows_do_not_stop_the_keyset(
        self, db: Database, channel: Channel
    ) -> None:
        """Batches of only bad rows are passed by keyset; every good row after them is invoiced."""
        await seed.plan(db.pool)
        for number, literal in enumerate(sorted(OUT_OF_RANGE.values())):
            end = PERIOD_END - timedelta(hours=10 - number)  # before the good rows
            await seed_raw_timestamp(
                db, f"poison_{number}", "current_period_start", literal, end=end
            )
        # An end Python cannot hold is never in the window: never read, never a candidate.
        await seed_raw_timestamp(db, "endless", "current_period_end", "infinity")
        good = await seed_good(db, 3)

        report = await make_scheduler(db, simulated(), channel, batch_size=2).tick(NOW)

        assert (report.candidates, report.skipped_bad, report.created_count) == (7, 4, 3)
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        assert await count(db, "mail_outbox") == 3
        await assert_renewal_invariants(db.pool)

    async def test_a_bad_row_is_logged_at_most_once_an_hour(
        self, db: Database, channel: Channel
    ) -> None:
        """Each full read counts a bad row, but its warning is repeated only after an hour."""
        await seed.plan(db.pool)
        await seed_raw_timestamp(db, "poison", "current_period_start", "-infinity")
        await seed.subscription(
            db.pool, "bad_email", period_start=PERIOD_START, period_end=PERIOD_END, email="x"
        )
        # Every tick reads the whole window (the watermark would skip rows already examined).
        scheduler = make_scheduler(db, simulated(), channel, full_pass_seconds=60.0)
        ticks = [
            NOW,
            NOW + timedelta(minutes=5),
            NOW + timedelta(minutes=59),
            NOW + timedelta(hours=1),
        ]

        logged: list[list[str]] = []
        reports = []
        for now in ticks:
            with capture_logs() as logs:
                reports.append(await scheduler.tick(now))
            logged.append(
                sorted(e["subscription_id"] for e in events(logs, "renewal_candidate_skipped"))
            )

        assert [report.skipped_bad for report in reports] == [2, 2, 2, 2]
        both = ["bad_email", "poison"]
        assert logged == [both, [], [], both]


class PoisonProvider(WrappedProvider):
    """Answers ``poison``'s order with a NUL in the address, as an unchecked provider would."""

    def __init__(self, inner: PaymentProvider, poison: str) -> None:
        super().__init__(inner)
        self.poison = poison

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice:
        answer = await super().create_invoice(request, now)
        if request.subscription_id != self.poison:
            return answer
        return msgspec.structs.replace(answer, payment_address=f"{answer.payment_address}\x00")


def requests_for(provider: WrappedProvider, sub_id: str) -> int:
    return sum(1 for request in provider.requests if request.subscription_id == sub_id)


async def the_claim(db: Database, sub_id: str) -> dict[str, Any]:
    [claim] = [row for row in await claims(db) if row["subscription_id"] == sub_id]
    return claim


class TestGroupIsolation:
    async def test_unstorable_answer_is_quarantined_and_the_group_committed(
        self, db: Database, channel: Channel
    ) -> None:
        """A NUL that reaches the grouped commit fails only its slot: the rest are stored once."""
        await seed.plan(db.pool)
        good = await seed_good(db, 40)
        await seed.subscription(db.pool, "poison", period_start=PERIOD_START, period_end=PERIOD_END)
        provider = PoisonProvider(simulated(latency_ms=5), "poison")
        scheduler = make_scheduler(db, provider, channel, failed_retry_hours=6.0)

        with capture_logs() as logs:
            report = await scheduler.tick(NOW)
        later = await scheduler.tick(NOW + timedelta(hours=5))

        assert (report.created_count, report.permanent_failures) == (40, 1)
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        assert await count(db, "mail_outbox") == 40
        claim = await the_claim(db, "poison")
        assert claim["state"] == "failed"
        assert claim["available_at"] == NOW + timedelta(hours=6)
        assert claim["last_error"].startswith("unstorable provider answer (payment sim_")
        assert "\x00" not in claim["last_error"]
        failed = events(logs, "renewal_invoice_failed")
        assert [(e["subscription_id"], e["order_id"]) for e in failed] == [
            ("poison", claim["order_id"])
        ]
        assert (later.claimed, requests_for(provider, "poison")) == (0, 1)
        await assert_renewal_invariants(db.pool)

    async def test_data_error_of_the_database_is_isolated(
        self, db: Database, channel: Channel
    ) -> None:
        """A class-22 error raised by the database for one slot fails only that slot."""
        await seed.plan(db.pool)
        good = await seed_good(db, 25)
        await seed.subscription(db.pool, "poison", period_start=PERIOD_START, period_end=PERIOD_END)
        await db.pool.execute(_REFUSE_INVOICE)

        report = await make_scheduler(db, simulated(), channel).tick(NOW)

        assert (report.created_count, report.permanent_failures) == (25, 1)
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        claim = await the_claim(db, "poison")
        assert claim["state"] == "failed"
        assert "22023" in claim["last_error"]
        await assert_renewal_invariants(db.pool)

    async def test_claim_that_cannot_be_released_is_counted_and_logged(
        self, db: Database, channel: Channel
    ) -> None:
        """A slot whose release fails even plainly is counted and logged at error by id."""
        await seed.plan(db.pool)
        good = await seed_good(db, 5)
        await seed.subscription(db.pool, "poison", period_start=PERIOD_START, period_end=PERIOD_END)
        await db.pool.execute(_REFUSE_INVOICE)
        await db.pool.execute(_REFUSE_RELEASE)

        with capture_logs() as logs:
            report = await make_scheduler(db, simulated(), channel).tick(NOW)

        assert (report.created_count, report.unreleasable) == (5, 1)
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        errors = events(logs, "renewal_claim_unreleasable")
        assert [(e["subscription_id"], e["log_level"]) for e in errors] == [("poison", "error")]
        assert (await the_claim(db, "poison"))["state"] == "claimed"


# A real data exception (class 22) raised by PostgreSQL for one subscription's rows.
_REFUSE_INVOICE = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.subscription_id = 'poison' THEN
        RAISE EXCEPTION 'poison data' USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON payment_invoices
    FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""
_REFUSE_RELEASE = """
CREATE TRIGGER refuse_poison_release BEFORE UPDATE ON nproxyd_renewal_claims
    FOR EACH ROW WHEN (NEW.state IN ('failed', 'retry'))
    EXECUTE FUNCTION refuse_poison();
"""


HOSTILE_ANSWERS = [
    Mode.NUL_ADDRESS,
    Mode.INVALID_UTF8,
    Mode.MISSING_ID,
    Mode.BAD_AMOUNT,
    Mode.BAD_DATE,
    Mode.LONG_FIELD,
    Mode.REFUSED_LATIN1,
    Mode.REFUSED_NUL,
]


class TestProviderAnswers:
    @pytest.mark.parametrize("mode", HOSTILE_ANSWERS, ids=lambda mode: mode.value)
    async def test_hostile_answer_fails_its_slot_only(
        self, db: Database, channel: Channel, mode: Mode
    ) -> None:
        """One order's hostile answer is a permanent failure naming it; others are stored once."""
        await seed.plan(db.pool)
        good = await seed_good(db, 6)
        await seed.subscription(db.pool, "poison", period_start=PERIOD_START, period_end=PERIOD_END)
        poison_order = order_id("poison", PERIOD_START)
        async with FakeNowPayments() as fake:
            fake.set_order_mode(poison_order, mode)
            provider = nowpayments(fake)
            try:
                scheduler = make_scheduler(db, provider, channel, failed_retry_hours=6.0)
                with capture_logs() as logs:
                    report = await scheduler.tick(NOW)
                later = await scheduler.tick(NOW + timedelta(hours=5))
            finally:
                await provider.aclose()

        assert (report.created_count, report.permanent_failures) == (6, 1)
        assert report.transient_failures == 0
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        assert await count(db, "mail_outbox") == 6
        claim = await the_claim(db, "poison")
        assert (claim["state"], claim["available_at"]) == ("failed", NOW + timedelta(hours=6))
        assert poison_order in claim["last_error"]
        payments = [p for p in fake.payments if p["order_id"] == poison_order]
        payment = payments[0] if payments else None
        if payment is not None and mode is not Mode.MISSING_ID:
            # The payment exists at the provider: the reason names it for an operator.
            assert str(payment["payment_id"]) in claim["last_error"]
        failed = events(logs, "renewal_invoice_failed")
        assert [(e["subscription_id"], e["order_id"], e["log_level"]) for e in failed] == [
            ("poison", poison_order, "warning")
        ]
        assert (later.claimed, fake.calls_for(poison_order)) == (0, 1)
        await assert_renewal_invariants(db.pool)


class TestUndeliverableRecipients:
    @pytest.mark.parametrize(
        ("email", "reason"),
        [
            ("a" * 250 + "@x.io", "user email: address is longer than 254 characters"),
            ("ana@" + "\u00fc" * 64 + ".de", "user email: domain cannot be encoded as IDNA"),
        ],
        ids=["too_long", "unencodable_domain"],
    )
    async def test_skipped_before_any_provider_call(
        self, db: Database, channel: Channel, email: str, reason: str
    ) -> None:
        """A recipient nproxyd can never deliver to is skipped by id before any provider call."""
        await seed.plan(db.pool)
        good = await seed_good(db, 2)
        await seed.subscription(
            db.pool, "undeliverable", period_start=PERIOD_START, period_end=PERIOD_END, email=email
        )
        provider = WrappedProvider(simulated())

        with capture_logs() as logs:
            report = await make_scheduler(db, provider, channel).tick(NOW)

        assert report.skipped_reasons == {reason: 1}
        skipped = events(logs, "renewal_candidate_skipped")
        assert [(e["subscription_id"], e["reason"]) for e in skipped] == [("undeliverable", reason)]
        assert requests_for(provider, "undeliverable") == 0
        assert await invoiced_once(db) == dict.fromkeys(good, 1)
        assert "undeliverable" not in {row["subscription_id"] for row in await claims(db)}


class TestDataErrors:
    async def test_nul_argument_is_a_data_error(self, db: Database) -> None:
        """A NUL refused by PostgreSQL (class 22) is a StoreDataError, not an outage."""
        with pytest.raises(StoreDataError, match="22021"):
            await db.fetch("extend_renewal_claims", "tok\x00en", NOW)

    async def test_unencodable_argument_is_a_data_error(self, db: Database) -> None:
        """A lone surrogate the driver cannot encode is a StoreDataError, not an outage."""
        with pytest.raises(StoreDataError) as caught:
            await db.execute("extend_renewal_claims", "tok\ud800en", NOW)
        assert "surrogates not allowed" in caught.value.message
        assert is_storable(caught.value.message)
