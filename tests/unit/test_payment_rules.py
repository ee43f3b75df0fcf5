"""Pure parts of the payment watcher: schedule, operator mail, simulated story, config rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest

from nproxyd.adapters.status_simulated import SimulatedPaymentStatus
from nproxyd.core.config import REDACTED, SimulatedPaymentConfig, load, redacted, secrets_of
from nproxyd.core.errors import ConfigError
from nproxyd.core.payments import (
    AwaitingInvoice,
    PaymentCheck,
    PaymentRef,
    ProviderPayment,
    Schedule,
    operator_mail,
)
from nproxyd.runtime.payments_view import render_awaiting

NOW = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
SCHEDULE = Schedule(min_check_seconds=60, max_check_seconds=1800)


def check(**fields: object) -> PaymentCheck:
    base: dict[str, object] = {
        "invoice_id": "inv-1",
        "provider_payment_id": "5001",
        "created_at": NOW,
        "amount_crypto": Decimal("29.00000000"),
        "currency": "USDT",
        "user_email": "buyer@example.com",
        "plan_code": "pro",
    }
    return msgspec.convert({**base, **fields}, PaymentCheck)


class TestSchedule:
    def test_a_change_checks_again_soon_and_quiet_answers_double_the_wait(self) -> None:
        """A new status: next check after min_check; the same status: twice the last wait."""
        changed = SCHEDULE.after_answer(check(provider_status=None), "waiting", NOW)
        quiet = SCHEDULE.after_answer(
            check(provider_status="waiting", quiet_checks=2), "waiting", NOW
        )
        assert changed == (NOW + timedelta(seconds=60), 0)
        assert quiet == (NOW + timedelta(seconds=480), 3)

    def test_waits_never_exceed_the_maximum(self) -> None:
        """However long an invoice stays quiet or failing, it is checked every max_check."""
        far = check(provider_status="waiting", quiet_checks=500, failures=500)
        assert SCHEDULE.after_answer(far, "waiting", NOW)[0] == NOW + timedelta(seconds=1800)
        assert SCHEDULE.after_failure(far, NOW)[0] == NOW + timedelta(seconds=1800)

    def test_refusals_wait_for_the_slow_cadence_and_429_for_retry_after(self) -> None:
        """401/403/404 wait max_check; a 429 waits its Retry-After, at least min_check."""
        assert SCHEDULE.after_refusal(NOW) == NOW + timedelta(seconds=1800)
        assert SCHEDULE.after_rate_limit(300, NOW) == NOW + timedelta(seconds=300)
        assert SCHEDULE.after_rate_limit(5, NOW) == NOW + timedelta(seconds=60)


class TestOperatorMail:
    def test_finished_mail_names_user_invoice_and_amounts(self) -> None:
        """The mail says which user and invoice to activate, and how much arrived."""
        payment = ProviderPayment(
            payment_id="5001", status="finished", actually_paid=Decimal("29"), pay_currency="usdt"
        )
        mail = operator_mail(check(), payment, "<m@x>")
        assert "inv-1" in mail.subject and "activate" in mail.subject
        assert "User: buyer@example.com" in mail.body
        assert "Plan: pro" in mail.body
        assert "Invoice amount: 29 USDT" in mail.body
        assert "Paid: 29 usdt" in mail.body
        assert mail.message_id == "<m@x>"

    def test_partial_mail_asks_for_a_look(self) -> None:
        """A partially paid invoice's mail says so in its subject."""
        payment = ProviderPayment(payment_id="5001", status="partially_paid", actually_paid=None)
        mail = operator_mail(check(user_email=None), payment, "<m@x>")
        assert "partially paid" in mail.subject
        assert "User: -" in mail.body and "Paid: -" in mail.body


@pytest.mark.anyio
class TestSimulatedStory:
    async def test_waiting_until_paid_after_then_finished(self) -> None:
        """Before paid_after_seconds: waiting with nothing paid; after: finished, fully paid."""
        source = SimulatedPaymentStatus(SimulatedPaymentConfig(paid_after_seconds=600))
        ref = PaymentRef(
            provider_payment_id="sim_1", created_at=NOW, amount=Decimal(29), currency="USDT"
        )
        before = await source.payment_status(ref, NOW + timedelta(seconds=599))
        after = await source.payment_status(ref, NOW + timedelta(seconds=600))
        assert (before.status, before.actually_paid) == ("waiting", Decimal(0))
        assert (after.status, after.actually_paid) == ("finished", Decimal(29))
        assert after.updated_at == NOW + timedelta(seconds=600)

    async def test_partial_fraction_picks_a_stable_share_of_invoices(self) -> None:
        """About partial_fraction of invoices end half paid, the same ones every time."""
        source = SimulatedPaymentStatus(
            SimulatedPaymentConfig(paid_after_seconds=0, partial_fraction=0.5)
        )

        async def story(number: int) -> str:
            ref = PaymentRef(
                provider_payment_id=f"sim_{number}", created_at=NOW, amount=Decimal(2), currency="X"
            )
            return (await source.payment_status(ref, NOW)).status

        first = [await story(n) for n in range(200)]
        again = [await story(n) for n in range(200)]
        assert first == again
        assert 60 < first.count("partially_paid") < 140
        assert set(first) == {"finished", "partially_paid"}


class TestConfig:
    def test_ipn_secret_is_a_secret(self) -> None:
        """The IPN secret is redacted in check-config output and scrubbed from logs."""
        config = load(None, {"NPROXYD__PAYMENT__NOWPAYMENTS__IPN_SECRET": "hush-123"})
        assert redacted(config)["payment"]["nowpayments"]["ipn_secret"] == REDACTED
        assert "hush-123" in secrets_of(config)

    @pytest.mark.parametrize(
        ("environ", "key"),
        [
            (
                {
                    "NPROXYD__ACTORS__PAYMENT_WATCHER__MIN_CHECK_SECONDS": "600",
                    "NPROXYD__ACTORS__PAYMENT_WATCHER__MAX_CHECK_SECONDS": "60",
                },
                "actors.payment_watcher.min_check_seconds",
            ),
            ({"NPROXYD__BILLING__OPERATOR_EMAIL": "not an address"}, "billing.operator_email"),
            ({"NPROXYD__IPN__LISTEN": "127.0.0.1:9188"}, "ipn.listen"),
            (
                {
                    "NPROXYD__IPN__LISTEN": "127.0.0.1:9187",
                    "NPROXYD__BILLING__PAYMENT_PROVIDER": "nowpayments",
                    "NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY": "k",
                    "NPROXYD__PAYMENT__NOWPAYMENTS__IPN_SECRET": "s",
                },
                "ipn.listen",
            ),
            (
                {
                    "NPROXYD__IPN__LISTEN": "127.0.0.1:9188",
                    "NPROXYD__BILLING__PAYMENT_PROVIDER": "nowpayments",
                    "NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY": "k",
                },
                "ipn.listen",
            ),
            ({"NPROXYD__PAYMENT__NOWPAYMENTS__MAX_REQUESTS_PER_SECOND": "0"}, "payment"),
        ],
    )
    def test_inconsistent_payment_settings_stop_startup_naming_the_key(
        self, environ: dict[str, str], key: str
    ) -> None:
        """Bad watcher, operator or IPN settings are config errors naming the key."""
        with pytest.raises(ConfigError) as caught:
            load(None, environ)
        assert caught.value.key.startswith(key)

    def test_ipn_with_nowpayments_and_a_secret_loads(self) -> None:
        """IPN on with the NOWPayments provider and its secret is a valid configuration."""
        config = load(
            None,
            {
                "NPROXYD__IPN__LISTEN": "127.0.0.1:9188",
                "NPROXYD__BILLING__PAYMENT_PROVIDER": "nowpayments",
                "NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY": "k",
                "NPROXYD__PAYMENT__NOWPAYMENTS__IPN_SECRET": "s",
                "NPROXYD__BILLING__OPERATOR_EMAIL": "ops@example.com",
            },
        )
        assert config.ipn.listen == "127.0.0.1:9188"


class TestAwaitingView:
    def rows(self) -> list[AwaitingInvoice]:
        common: dict[str, object] = {
            "invoice_status": "pending",
            "user_email": "a@example.com",
            "plan_code": "pro",
            "amount_crypto": "29.00000000",
            "currency": "USDT",
            "amount_usd": "29",
            "pay_currency": "usdt",
            "provider_payment_id": "1",
        }
        partial = {
            "invoice_id": "inv-p",
            "provider_status": "partially_paid",
            "actually_paid": "10",
        }
        paid = {"invoice_id": "inv-f", "provider_status": "finished", "actually_paid": "29"}
        return [
            msgspec.convert({**common, **partial, "since": NOW}, AwaitingInvoice, strict=False),
            msgspec.convert(
                {**common, **paid, "since": NOW + timedelta(minutes=1)},
                AwaitingInvoice,
                strict=False,
            ),
        ]

    def test_table_lists_finished_first_and_marks_partial_with_paid_and_due(self) -> None:
        """Finished invoices come first; a partial one is marked PARTIAL with paid vs due."""
        text = render_awaiting(self.rows(), as_json=False, now=NOW + timedelta(minutes=61))
        lines = text.splitlines()
        assert lines[1].startswith("inv-f")
        assert lines[2].startswith("inv-p")
        assert "PARTIAL partially_paid" in lines[2]
        assert "10 usdt" in lines[2] and "29 USDT" in lines[2]
        assert "(61 min)" in lines[2]

    def test_json_lines_carry_the_partial_flag(self) -> None:
        """--json prints one object per invoice with `partial` set for partially paid ones."""
        text = render_awaiting(self.rows(), as_json=True, now=NOW)
        flags = {row["invoice_id"]: row["partial"] for row in map(json.loads, text.splitlines())}
        assert flags == {"inv-p": True, "inv-f": False}
        assert render_awaiting([], as_json=True, now=NOW) == ""
