"""Ports: what the actors and the runtime need from the outside world, as Protocols.

Adapters in :mod:`nproxyd.adapters` implement them and translate every failure into the
project's exception tree (:mod:`nproxyd.core.errors`), deciding once whether it is transient.
Stores in :mod:`nproxyd.store` implement the ``…Store`` ports; a port is named after what its
user needs (``ExpiryStore``, ``RenewalClaimStore``, ``MailOutboxStore``, ``KeyPoolStore``,
``PaymentWatchStore``, ``HealthReadStore``), never after a table. Paging stays inside the
store: a port that walks many rows yields batches.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from decimal import Decimal
from email.message import Message
from typing import Protocol

import anyio
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
from nproxyd.core.records import (
    ClaimedSlot,
    CompletedSlot,
    HealthGauges,
    KeyRow,
    KeyTransition,
    LatestFailures,
    MailOutcome,
    OutboxMail,
    ReleasedSlot,
    RenewalCandidate,
    StoredInvoice,
    UnreadableCandidate,
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


class RenewalClaimStore(Protocol):
    """What the renewal scheduler reads and writes: due candidates, claims, grouped commits."""

    def due_candidates(
        self,
        now: datetime,
        window_end: datetime,
        size: int,
        *,
        after: tuple[datetime, str] = ...,
    ) -> AsyncIterator[list[RenewalCandidate | UnreadableCandidate]]:
        """Every subscription due for renewal in ``(now, window_end]``, ``size`` at a time,
        from the keyset position ``after`` (period end, id) on (default: the start)."""
        ...

    async def retry_floor(self, now: datetime, window_end: datetime) -> datetime | None:
        """The earliest period end in the window whose current cycle has an open claim
        available at ``now``, or None."""
        ...

    async def claim(
        self,
        slots: Sequence[tuple[str, datetime, str]],
        *,
        holder: str,
        token: str,
        now: datetime,
        lease_until: datetime,
    ) -> list[ClaimedSlot]: ...

    async def commit(
        self, invoices: Sequence[StoredInvoice], *, provider: str, now: datetime
    ) -> list[CompletedSlot]: ...

    async def release(self, slots: Sequence[ReleasedSlot], now: datetime) -> int: ...

    async def extend(self, token: str, lease_until: datetime) -> int: ...


class MailOutboxStore(Protocol):
    """What the mail sender reads and writes: leased batches of due mail and their outcomes."""

    def due_mail(
        self, now: datetime, size: int, *, holder: str, lease_until: Callable[[], datetime]
    ) -> AsyncGenerator[list[OutboxMail], None]:
        """Lease every mail due at ``now``, ``size`` at a time, each batch until
        ``lease_until()``."""
        ...

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int: ...

    async def extend(self, ids: Sequence[str], holder: str, lease_until: datetime) -> int: ...


class KeyPoolStore(Protocol):
    """What the key-pool recoverer reads and writes."""

    async def recover(self, now: datetime) -> list[str]: ...

    async def claim_balance_due(
        self, now: datetime, poll_seconds: float, limit: int
    ) -> list[KeyRow]: ...

    async def record_balances(
        self, ids: Sequence[str], balances: Sequence[Decimal], now: datetime
    ) -> None: ...

    async def record_failures(
        self,
        ids: Sequence[str],
        errors: Sequence[str],
        now: datetime,
        *,
        cooldown_minutes: float,
        failures_before_manual_review: int,
    ) -> list[KeyTransition]: ...


class HealthReadStore(Protocol):
    """What the operations surface reads: the database-backed gauges and latest failures."""

    async def gauges(self, now: datetime) -> HealthGauges: ...

    async def latest_failures(self) -> LatestFailures: ...


class KeyCountStore(Protocol):
    """Provider keys by status, for the gauges."""

    async def counts(self) -> dict[str, int]: ...


class NotifySession(Protocol):
    """An open LISTEN session: ``lost`` is set when it ends for any reason."""

    channel: str
    lost: anyio.Event

    @property
    def backend_pid(self) -> int: ...

    async def ping(self) -> None:
        """Raise :class:`~nproxyd.core.errors.DatabaseUnavailable` unless it still answers."""
        ...


# Opens a LISTEN session that calls its argument for every notification; raises
# DatabaseUnavailable when it cannot.
NotifySessions = Callable[[Callable[[], None]], AbstractAsyncContextManager[NotifySession]]
