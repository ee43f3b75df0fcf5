"""Provider answers are checked before they are trusted (pure).

A payment provider's answer ends up in SQL (the invoice, its mail) and in front of a customer.
One that cannot be stored or makes no sense is a permanent failure for its slot: the payment
may exist at the provider, so the error names the order id and the provider's payment id (made
storable) for an operator to cancel it there.
"""

from __future__ import annotations

from decimal import Decimal

from nproxyd.core.errors import ProviderPermanentError
from nproxyd.core.ports import ProviderInvoice
from nproxyd.core.text import has_unprintable, is_storable, storable

MAX_PAYMENT_ID_LENGTH = 128
MAX_PAY_ADDRESS_LENGTH = 256
MAX_PAY_CURRENCY_LENGTH = 32
MAX_PAY_AMOUNT = Decimal("1e15")
_MAX_QUOTED_ID = 128


def text_problem(name: str, value: str | None, limit: int) -> str | None:
    """Why an answer's text field cannot be trusted, or None."""
    if value is None:
        return None
    if not is_storable(value) or has_unprintable(value):
        return f"{name} contains a NUL, control characters or invalid text"
    if len(value) > limit:
        return f"{name} is longer than {limit} characters"
    return None


def invoice_problem(invoice: ProviderInvoice) -> str | None:
    """Why a provider's invoice answer cannot be trusted, or None when it can."""
    if not invoice.provider_invoice_id:
        return "no payment id"
    for name, value, limit in (
        ("payment id", invoice.provider_invoice_id, MAX_PAYMENT_ID_LENGTH),
        ("pay_address", invoice.payment_address, MAX_PAY_ADDRESS_LENGTH),
        ("pay_currency", invoice.pay_currency, MAX_PAY_CURRENCY_LENGTH),
    ):
        problem = text_problem(name, value, limit)
        if problem is not None:
            return problem
    amount = invoice.pay_amount
    if amount is not None and not (amount.is_finite() and 0 <= amount < MAX_PAY_AMOUNT):
        return "pay_amount is not a plausible amount"
    if invoice.expires_at is not None and invoice.expires_at.utcoffset() is None:
        return "expiry has no time zone"
    return None


def invalid_answer(
    provider: str, order_id: str, payment_id: object | None, problem: str
) -> ProviderPermanentError:
    """The permanent error for an answer that cannot be trusted, naming the order and payment."""
    payment = "" if payment_id in (None, "") else f" (payment {payment_id})"
    return ProviderPermanentError(
        storable(f"invalid response from {provider} for order {order_id}{payment}: {problem}")
    )


def checked_invoice(invoice: ProviderInvoice, *, provider: str, order_id: str) -> ProviderInvoice:
    """``invoice`` when it can be trusted; else raises :class:`ProviderPermanentError`."""
    problem = invoice_problem(invoice)
    if problem is None:
        return invoice
    payment_id = storable(invoice.provider_invoice_id, _MAX_QUOTED_ID)
    raise invalid_answer(provider, order_id, payment_id, problem)
