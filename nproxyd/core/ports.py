"""Ports: what the actors need from the outside world, as Protocols.

Adapters in :mod:`nproxyd.adapters` implement them and translate every failure into the
project's exception tree (:mod:`nproxyd.core.errors`), deciding once whether it is transient.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from email.message import Message
from typing import Protocol

import msgspec

from nproxyd.core.payments import (
    AwaitingInvoice,
    AwaitingSummary,
    CheckResult,
    DueChecks,
    IpnOutcome,
    PaymentCheck,
    PaymentRef,
    ProviderPayment,
    RecordContext,
    StatusChange,
    StatusHistoryEntry,
)


class InvoiceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the renewal scheduler asks a payment provider for."""

    order_id: str  # idempotency reference derived from the renewal claim
    subscription_id: str
    user_id: str
    plan_code: str
    amount_usd: Decimal
    currency: str  # the plan's billing currency, e.g. USDT
    description: str


class ProviderInvoice(msgspec.Struct, frozen=True, kw_only=True):
    """What a payment provider answered for an :class:`InvoiceRequest`."""

    provider_invoice_id: str
    payment_address: str | None
    pay_amount: Decimal | None
    pay_currency: str | None
    expires_at: datetime | None


class PaymentProvider(Protocol):
    """Creates payment invoices at a provider.

    ``create_invoice`` raises :class:`~nproxyd.core.errors.ProviderTransientError` when the
    request may succeed later (including when its outcome is unknown) and
    :class:`~nproxyd.core.errors.ProviderPermanentError` when it will not.
    """

    name: str

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice: ...

    async def aclose(self) -> None: ...


class MailTransport(Protocol):
    """Delivers one composed message to one recipient.

    ``send`` raises :class:`~nproxyd.core.errors.MailTransientError` (retry later) or
    :class:`~nproxyd.core.errors.MailPermanentError` (never retry). It may be called
    concurrently; an implementation bounds and reuses its own connections.
    """

    async def send(self, message: Message, recipient: str) -> None: ...

    async def aclose(self) -> None: ...


class ProviderKeyRef(msgspec.Struct, frozen=True, kw_only=True):
    """A provider API key as the balance probe sees it (never the key's secret)."""

    id: str
    provider: str
    label: str


class BalanceProbe(Protocol):
    """Reads a provider key's balance; raises :class:`~nproxyd.core.errors.BalanceProbeError`."""

    async def balance(self, key: ProviderKeyRef) -> Decimal: ...


class ExpiryStore(Protocol):
    """Expires due pending invoices in bounded statements, however it walks them."""

    def expire_due(self, now: datetime, batch_size: int) -> AsyncIterator[int]:
        """Expire every pending invoice due at ``now``; yields each statement's count."""
        ...


class PaymentStatusSource(Protocol):
    """Reads a payment's status at the provider.

    ``payment_status`` raises :class:`~nproxyd.core.errors.ProviderRateLimited` (slow down),
    :class:`~nproxyd.core.errors.ProviderInvalidAnswer` (an answer that cannot be stored),
    another :class:`~nproxyd.core.errors.ProviderTransientError` (try again later) or
    :class:`~nproxyd.core.errors.ProviderPermanentError` (refused: 401, 403, 404).
    """

    name: str

    async def payment_status(self, ref: PaymentRef, now: datetime) -> ProviderPayment: ...


class IpnVerifier(Protocol):
    """Checks an instant payment notification's signature and reads it.

    ``verify`` raises :class:`~nproxyd.core.errors.IpnRejected` for a missing or bad signature
    and :class:`~nproxyd.core.errors.ProviderInvalidAnswer` for a signed body it cannot read.
    """

    def verify(self, body: bytes, signature: str | None) -> ProviderPayment: ...


class PaymentWatchStore(Protocol):
    """What the payment watcher reads and writes (paging stays inside the store)."""

    def due_checks(
        self,
        now: datetime,
        size: int,
        *,
        grace_hours: float,
        lease_until: Callable[[], datetime],
    ) -> AsyncIterator[DueChecks]: ...

    async def discover(self, provider: str, now: datetime, grace_hours: float) -> int: ...

    async def record(
        self, results: Sequence[CheckResult], context: RecordContext
    ) -> list[StatusChange]: ...

    async def track_payment(
        self, provider: str, provider_payment_id: str, now: datetime
    ) -> PaymentCheck | None: ...

    async def settle_awaiting(self, now: datetime) -> int: ...

    async def awaiting(self) -> list[AwaitingInvoice]: ...

    async def awaiting_summary(self, now: datetime) -> AwaitingSummary: ...

    async def history(self, invoice_id: str) -> list[StatusHistoryEntry]: ...


class IpnSink(Protocol):
    """Receives instant payment notifications (the payment watcher)."""

    async def receive_ipn(self, body: bytes, signature: str | None) -> IpnOutcome: ...
