"""Adapters for ``nproxyd once --dry-run``: they record what would happen and do nothing.

The dry provider answers every request with a placeholder invoice (ids start with
``dry-run-``) without any network call, and answers no payment status check (each is a
transient "not asked"); the dry transport counts the mail it would deliver and
sends nothing. Together with a database whose work is always rolled back, a dry run executes
exactly the code of a real tick and leaves no trace.
"""

from __future__ import annotations

from datetime import datetime
from email.message import Message

from nproxyd.core.errors import ProviderTransientError
from nproxyd.core.payments import PaymentRef, ProviderPayment
from nproxyd.core.ports import InvoiceRequest, ProviderInvoice

PLACEHOLDER_PREFIX = "dry-run-"


class DryRunProvider:
    """A :class:`~nproxyd.core.ports.PaymentProvider` that calls no provider."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice:
        self.calls.append(request.order_id)
        return ProviderInvoice(
            provider_invoice_id=f"{PLACEHOLDER_PREFIX}{request.order_id}",
            payment_address=None,
            pay_amount=None,
            pay_currency=None,
            expires_at=None,
        )

    async def payment_status(self, ref: PaymentRef, now: datetime) -> ProviderPayment:
        """Asks nothing: the check counts as a transient failure ("not asked") and is rolled
        back with everything else."""
        self.calls.append(ref.provider_payment_id)
        raise ProviderTransientError("dry run: the provider was not asked")

    async def aclose(self) -> None:
        return None


class DryRunTransport:
    """A :class:`~nproxyd.core.ports.MailTransport` that sends nothing."""

    def __init__(self) -> None:
        self.recipients: list[str] = []

    async def send(self, message: Message, recipient: str) -> None:
        self.recipients.append(recipient)

    async def aclose(self) -> None:
        return None
