"""Provider answers are checked before they are trusted (nproxyd.core.answers)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from nproxyd.core.answers import checked_invoice, invoice_problem
from nproxyd.core.errors import ProviderPermanentError
from nproxyd.core.ports import ProviderInvoice
from nproxyd.core.text import is_storable

GOOD = ProviderInvoice(
    provider_invoice_id="5000000001",
    payment_address="TFake0001",
    pay_amount=Decimal("29"),
    pay_currency="usdttrc20",
    expires_at=datetime(2026, 3, 10, tzinfo=UTC),
)


def answer(**changes: Any) -> ProviderInvoice:
    return msgspec.structs.replace(GOOD, **changes)


class TestInvoiceProblem:
    def test_good_answer_is_trusted(self) -> None:
        """A complete answer, or one without the optional fields, has no problem."""
        assert invoice_problem(GOOD) is None
        bare = answer(payment_address=None, pay_amount=None, pay_currency=None, expires_at=None)
        assert invoice_problem(bare) is None

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"provider_invoice_id": ""}, "no payment id"),
            ({"provider_invoice_id": "5\x00"}, "payment id contains a NUL"),
            ({"provider_invoice_id": "9" * 129}, "payment id is longer than 128 characters"),
            ({"payment_address": "T\x00"}, "pay_address contains a NUL"),
            ({"payment_address": "T\ud800"}, "pay_address contains a NUL"),
            ({"payment_address": "T\nBcc"}, "pay_address contains a NUL"),
            ({"payment_address": "T" * 257}, "pay_address is longer than 256 characters"),
            ({"pay_currency": "u" * 33}, "pay_currency is longer than 32 characters"),
            ({"pay_amount": Decimal("NaN")}, "pay_amount is not a plausible amount"),
            ({"pay_amount": Decimal("-1")}, "pay_amount is not a plausible amount"),
            ({"pay_amount": Decimal("1e400")}, "pay_amount is not a plausible amount"),
            ({"expires_at": datetime(2026, 3, 10)}, "expiry has no time zone"),
        ],
    )
    def test_untrustworthy_answer_is_named(self, changes: dict[str, Any], reason: str) -> None:
        """Each kind of untrustworthy answer has its reason."""
        problem = invoice_problem(answer(**changes))
        assert problem is not None
        assert problem.startswith(reason)


class TestCheckedInvoice:
    def test_good_answer_is_returned(self) -> None:
        """A trustworthy answer passes unchanged."""
        assert checked_invoice(GOOD, provider="simulated", order_id="renewal-s-1") is GOOD

    def test_error_names_order_and_payment_storably(self) -> None:
        """The permanent error names the order and the payment id, cleaned of its NUL."""
        bad = answer(provider_invoice_id="50\x00", payment_address="x" * 300)
        with pytest.raises(ProviderPermanentError) as caught:
            checked_invoice(bad, provider="nowpayments", order_id="renewal-s-1")
        message = caught.value.message
        assert is_storable(message)
        assert message.startswith("invalid response from nowpayments for order renewal-s-1")
        assert "(payment 50\ufffd" in message
