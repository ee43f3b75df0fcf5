"""Pure renewal rules: the email body, candidate checks, the order id and retry backoff."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nproxyd.core.clock import format_instant
from nproxyd.core.rules import (
    backoff_seconds,
    candidate_problem,
    format_amount,
    order_id,
    random_uuid,
    render_renewal_body,
)

PERIOD_END = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
EXPIRES_AT = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
BASE_URL = "https://app.nproxy.example"


def body(
    *,
    amount: Decimal = Decimal("29.00"),
    currency: str = "USDT",
    payment_address: str | None = "TXyz123",
    expires_at: datetime | None = EXPIRES_AT,
    app_base_url: str = BASE_URL,
    period_end: datetime = PERIOD_END,
) -> str:
    return render_renewal_body(
        period_end=period_end,
        amount=amount,
        currency=currency,
        payment_address=payment_address,
        expires_at=expires_at,
        app_base_url=app_base_url,
    )


class TestRenewalBody:
    def test_full_body_byte_for_byte(self) -> None:
        """With an address and an expiry the body is the six lines of DESIGN §2 step 5."""
        assert body() == (
            "Your current subscription period is ending soon.\n"
            "Current access ends at 2026-03-12T11:00:00.000Z.\n"
            "Invoice amount: 29 USDT.\n"
            "Payment address: TXyz123.\n"
            "Invoice expires at 2026-03-10T12:00:00.000Z.\n"
            "Open billing: https://app.nproxy.example/billing"
        )

    def test_body_without_address_or_expiry(self) -> None:
        """Without an address and an expiry those two lines are left out, nothing else."""
        assert body(payment_address=None, expires_at=None) == (
            "Your current subscription period is ending soon.\n"
            "Current access ends at 2026-03-12T11:00:00.000Z.\n"
            "Invoice amount: 29 USDT.\n"
            "Open billing: https://app.nproxy.example/billing"
        )

    def test_body_with_address_but_no_expiry(self) -> None:
        """An address without an expiry keeps the address line and drops only the expiry."""
        assert body(expires_at=None).splitlines() == [
            "Your current subscription period is ending soon.",
            "Current access ends at 2026-03-12T11:00:00.000Z.",
            "Invoice amount: 29 USDT.",
            "Payment address: TXyz123.",
            "Open billing: https://app.nproxy.example/billing",
        ]

    def test_body_with_expiry_but_no_address(self) -> None:
        """An expiry without an address keeps the expiry line and drops only the address."""
        assert body(payment_address=None).splitlines() == [
            "Your current subscription period is ending soon.",
            "Current access ends at 2026-03-12T11:00:00.000Z.",
            "Invoice amount: 29 USDT.",
            "Invoice expires at 2026-03-10T12:00:00.000Z.",
            "Open billing: https://app.nproxy.example/billing",
        ]

    def test_empty_address_counts_as_none(self) -> None:
        """An empty payment address prints no address line."""
        assert "Payment address" not in body(payment_address="")

    @pytest.mark.parametrize(
        ("amount", "text"),
        [
            (Decimal("29.00"), "Invoice amount: 29 USDT."),
            (Decimal("12.50"), "Invoice amount: 12.5 USDT."),
            (Decimal("100.00"), "Invoice amount: 100 USDT."),
            (Decimal("0.99"), "Invoice amount: 0.99 USDT."),
        ],
    )
    def test_amount_has_no_trailing_zeros(self, amount: Decimal, text: str) -> None:
        """Amounts print without trailing zeros and without an exponent."""
        assert body(amount=amount).splitlines()[2] == text

    def test_format_amount_examples_from_the_design(self) -> None:
        """Decimal('29.00') prints as 29 and Decimal('12.50') as 12.5."""
        assert (format_amount(Decimal("29.00")), format_amount(Decimal("12.50"))) == ("29", "12.5")

    @pytest.mark.parametrize("base", [BASE_URL, BASE_URL + "/"])
    def test_billing_link_with_and_without_trailing_slash(self, base: str) -> None:
        """The billing link is <app_base_url>/billing with exactly one slash."""
        assert body(app_base_url=base).splitlines()[-1] == (
            "Open billing: https://app.nproxy.example/billing"
        )

    def test_times_are_rendered_in_utc_with_milliseconds(self) -> None:
        """A non-UTC or sub-second time is rendered in UTC as YYYY-MM-DDTHH:MM:SS.mmmZ."""
        plus_two = timezone(timedelta(hours=2))
        lines = body(
            period_end=datetime(2026, 3, 12, 13, 0, tzinfo=plus_two),
            expires_at=datetime(2026, 3, 10, 12, 0, 5, 123_456, tzinfo=UTC),
        ).splitlines()
        assert lines[1] == "Current access ends at 2026-03-12T11:00:00.000Z."
        assert lines[4] == "Invoice expires at 2026-03-10T12:00:05.123Z."


def strftime_instant(value: datetime) -> str:
    """The instant format written out with strftime, as format_instant was first built."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class TestFormatInstant:
    @given(
        st.datetimes(
            min_value=datetime(1, 1, 2),
            max_value=datetime(9999, 12, 30),
            timezones=st.sampled_from([UTC, timezone(timedelta(hours=-9, minutes=-30))]),
        )
    )
    def test_same_text_as_strftime_for_any_instant(self, value: datetime) -> None:
        """The fast path (isoformat) and the years before 1000 give strftime's text."""
        assert format_instant(value) == strftime_instant(value)

    def test_milliseconds_are_truncated_not_rounded(self) -> None:
        value = datetime(2026, 3, 12, 23, 59, 59, 999_999, tzinfo=UTC)
        assert format_instant(value) == "2026-03-12T23:59:59.999Z"


class TestRandomUuid:
    def test_text_and_hex_of_one_version_4_uuid(self) -> None:
        text, digits = random_uuid()
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert (str(parsed), parsed.hex) == (text, digits)

    def test_each_call_is_new(self) -> None:
        assert len({random_uuid()[0] for _ in range(1000)}) == 1000


def problem(**overrides: Any) -> str | None:
    values: dict[str, Any] = {
        "email": "ana@example.com",
        "price": Decimal("29.00"),
        "currency": "USDT",
    }
    values.update(overrides)
    return candidate_problem(**values)


class TestCandidateProblem:
    def test_good_candidate_has_no_problem(self) -> None:
        """A plan with a 2-decimal price, a currency and a plain address is invoiceable."""
        assert problem() is None

    def test_zero_price_is_not_a_problem(self) -> None:
        """A free plan (price 0.00) is not a bad row."""
        assert problem(price=Decimal("0.00")) is None

    @pytest.mark.parametrize(
        ("field", "value", "reason"),
        [
            ("price", None, "plan price is missing"),
            ("price", Decimal("-1.00"), "plan price is negative"),
            ("price", Decimal("29.001"), "plan price has more than 2 decimals"),
            ("price", Decimal("NaN"), "plan price is not a number"),
            ("currency", "", "plan billing currency is empty"),
            ("currency", "   ", "plan billing currency is empty"),
            ("currency", None, "plan billing currency is empty"),
            ("email", None, "user email: address is missing"),
            ("email", "", "user email: address is missing"),
            ("email", "not-an-address", "user email: address is not a plain local@domain"),
            ("email", "ana@", "user email: address is not a plain local@domain"),
            ("email", "@example.com", "user email: address is not a plain local@domain"),
            ("email", "ana smith@example.com", "user email: address is not a plain local@domain"),
            ("email", "Ana <ana@example.com>", "user email: address is not a plain local@domain"),
            (
                "email",
                "ana@example.com\nBcc: x@evil.example",
                "user email: address contains control characters or invalid text",
            ),
            (
                "email",
                "a@example.com, b@example.com",
                "user email: address is not a plain local@domain",
            ),
            ("email", "a" * 250 + "@x.io", "user email: address is longer than 254 characters"),
            ("email", "a" * 65 + "@x.io", "user email: local part is longer than 64 characters"),
            ("email", "ana@" + "ü" * 64 + ".de", "user email: domain cannot be encoded as IDNA"),
        ],
    )
    def test_bad_candidate_is_named(self, field: str, value: object, reason: str) -> None:
        """Each kind of bad row is refused with its own reason."""
        assert problem(**{field: value}) == reason


class TestOrderId:
    START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def test_same_slot_same_order_id(self) -> None:
        """The order id of a slot is the same on every call, whatever the time zone given."""
        other_zone = self.START.astimezone(timezone(timedelta(hours=-5)))
        # 2026-03-01T12:00:00Z in microseconds since the epoch: the reference never changes.
        assert order_id("sub-1", self.START) == "renewal-sub-1-1772366400000000"
        assert order_id("sub-1", self.START) == order_id("sub-1", other_zone)

    def test_other_slot_other_order_id(self) -> None:
        """Another cycle or another subscription gets another order id."""
        ids = {
            order_id("sub-1", self.START),
            order_id("sub-1", self.START + timedelta(days=30)),
            order_id("sub-2", self.START),
        }
        assert len(ids) == 3


class TestBackoff:
    def test_exponential_without_jitter(self) -> None:
        """Without an rng the delay doubles per failure from the base."""
        delays = [backoff_seconds(n, base_seconds=60, cap_seconds=3600) for n in (1, 2, 3, 4)]
        assert delays == [60, 120, 240, 480]

    def test_capped(self) -> None:
        """The delay never exceeds the cap, even after very many failures."""
        assert backoff_seconds(7, base_seconds=60, cap_seconds=3600) == 3600
        assert backoff_seconds(10_000, base_seconds=60, cap_seconds=3600) == 3600

    def test_zero_failures_waits_the_base(self) -> None:
        """A failure count below 1 is treated as the first failure."""
        assert backoff_seconds(0, base_seconds=60, cap_seconds=3600) == 60

    @pytest.mark.parametrize("failures", [1, 3, 50])
    def test_jitter_within_half_and_full(self, failures: int) -> None:
        """With an rng the delay lies in [50 %, 100 %] of the capped value and varies."""
        capped = backoff_seconds(failures, base_seconds=60, cap_seconds=3600)
        rng = random.Random(1)
        delays = [
            backoff_seconds(failures, base_seconds=60, cap_seconds=3600, rng=rng)
            for _ in range(500)
        ]
        assert all(0.5 * capped <= delay <= capped for delay in delays)
        assert min(delays) < 0.6 * capped
        assert max(delays) > 0.9 * capped


class TestOrderIdResolution:
    def test_cycles_within_one_second_get_distinct_order_ids(self) -> None:
        """Two cycle starts a microsecond apart never share a provider reference."""
        start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        assert order_id("s", start) != order_id("s", start + timedelta(microseconds=1))
