"""Records: what the stores hand the actors and the runtime, as frozen msgspec Structs.

They belong to the core, like the ports (:mod:`nproxyd.core.ports`) that return them, so an
actor never imports the store package.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import msgspec


class RenewalCandidate(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: str
    user_id: str
    current_period_end: datetime
    cycle_start: datetime
    email: str | None
    plan_code: str
    monthly_price_usd: Decimal | None
    billing_currency: str | None


class UnreadableCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """A due subscription whose cycle start Python cannot represent (±infinity, BC, year 10000+).

    ``column`` names the subscription column the cycle start came from.
    """

    subscription_id: str
    current_period_end: datetime
    column: str


class ClaimedSlot(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: str
    cycle_start: datetime
    order_id: str
    attempts: int


class StoredInvoice(msgspec.Struct, frozen=True, kw_only=True):
    """An invoice to store with its renewal mail, for a slot this instance claimed."""

    subscription_id: str
    cycle_start: datetime
    token: str
    invoice_id: str
    user_id: str
    provider_invoice_id: str
    currency: str
    amount: Decimal
    payment_address: str | None
    expires_at: datetime | None
    to_address: str
    body: str
    message_id: str


class ReleasedSlot(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed slot given back after a provider failure."""

    subscription_id: str
    cycle_start: datetime
    token: str
    state: str  # 'retry' or 'failed'
    available_at: datetime
    error: str


class CompletedSlot(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: str
    superseded: bool


class KeyRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    provider: str
    label: str


class KeyTransition(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str


class OutboxMail(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    to_address: str
    subject: str
    body: str
    message_id: str
    attempts: int


class MailOutcome(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str  # 'sent', 'pending' (retry later) or 'dead'
    error: str | None
    next_attempt_at: datetime
    # False when the server was unavailable: nothing was said about this mail, so the
    # outcome does not use up one of its max_attempts.
    counts_attempt: bool = True


class DeadMail(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    to_address: str
    subject: str
    attempts: int
    last_error: str | None
    updated_at: datetime | None  # None when the stored value is outside Python's range


class OutboxCounts(msgspec.Struct, frozen=True, kw_only=True):
    pending: int
    dead: int


class HealthGauges(msgspec.Struct, frozen=True, kw_only=True):
    """The database-backed gauges of one scrape."""

    outbox_pending: int
    mail_dead: int
    oldest_due_at: datetime | None
    claims_claimed: int
    claims_retry: int
    claims_failed: int


class LatestFailures(msgspec.Struct, frozen=True, kw_only=True):
    """The most recent stored error of an open renewal claim and of an undelivered mail."""

    renewal_error: str | None
    mail_error: str | None
