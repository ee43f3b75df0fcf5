"""Payment watching: the records, the per-invoice schedule and the operator mail (pure).

The payment watcher asks the provider for the status of every open invoice and keeps what it
answered in nproxyd's own tables. Nothing here activates anything: an invoice is set ``paid``
and its subscription changed only by the web API's admin (docs/design.md, invariant 9).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

import msgspec

from nproxyd.core.clock import format_instant
from nproxyd.core.rules import format_amount

KNOWN_STATUSES = frozenset(
    {
        "waiting",
        "confirming",
        "confirmed",
        "sending",
        "partially_paid",
        "finished",
        "failed",
        "refunded",
        "expired",
    }
)
# After one of these the provider's answer never changes again: the invoice is not checked again.
FINAL_STATUSES = ("finished", "failed", "refunded", "expired")
# What an operator must act on: activate (finished) or look at (partially_paid).
AWAITING_STATUSES = ("finished", "partially_paid")

Source = Literal["poll", "ipn"]
# "unauthorized": the provider refused the API key (401/403), which fails every check; a refusal
# of one payment (404, another 4xx) is "permanent".
CheckOutcome = Literal["ok", "transient", "permanent", "rate_limited", "invalid", "unauthorized"]
CHECK_OUTCOMES: tuple[CheckOutcome, ...] = (
    "ok",
    "transient",
    "permanent",
    "rate_limited",
    "invalid",
    "unauthorized",
)


class PaymentRef(msgspec.Struct, frozen=True, kw_only=True):
    """An invoice's payment as a provider is asked about it."""

    provider_payment_id: str
    created_at: datetime | None  # None: the invoice's time cannot be represented
    amount: Decimal
    currency: str


class ProviderPayment(msgspec.Struct, frozen=True, kw_only=True):
    """What the provider reports about one payment, cleaned and validated by the adapter."""

    payment_id: str
    status: str
    actually_paid: Decimal | None = None
    pay_amount: Decimal | None = None
    pay_currency: str | None = None
    outcome_amount: Decimal | None = None
    outcome_currency: str | None = None
    updated_at: datetime | None = None


class PaymentCheck(msgspec.Struct, frozen=True, kw_only=True):
    """An invoice whose payment is due to be checked, with what the operator mail names."""

    invoice_id: str
    provider_payment_id: str
    created_at: datetime | None  # None: stored as ±infinity or outside years 1-9999
    amount_crypto: Decimal
    currency: str
    user_email: str | None = None
    plan_code: str | None = None
    provider_status: str | None = None
    quiet_checks: int = 0
    failures: int = 0

    def ref(self) -> PaymentRef:
        return PaymentRef(
            provider_payment_id=self.provider_payment_id,
            created_at=self.created_at,
            amount=self.amount_crypto,
            currency=self.currency,
        )


class DueChecks(msgspec.Struct, frozen=True, kw_only=True):
    """One batch of due checks; ``retired`` invoices left the watch (paid, or grace passed)."""

    checks: list[PaymentCheck]
    retired: int = 0


class OperatorMail(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    body: str
    message_id: str


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """One check's result as it is recorded."""

    invoice_id: str
    outcome: CheckOutcome
    payment: ProviderPayment | None = None
    error: str | None = None
    next_check_at: datetime | None = None  # ignored for notifications
    quiet_checks: int = 0
    failures: int = 0
    mail: OperatorMail | None = None


class RecordContext(msgspec.Struct, frozen=True, kw_only=True):
    now: datetime
    source: Source
    operator_email: str | None = None


class StatusChange(msgspec.Struct, frozen=True, kw_only=True):
    invoice_id: str
    from_status: str | None
    to_status: str
    source: str
    mailed: bool = False


class AwaitingInvoice(msgspec.Struct, frozen=True, kw_only=True):
    """An invoice the provider reports paid (or partly) that is not ``paid`` yet."""

    invoice_id: str
    invoice_status: str
    user_email: str | None
    plan_code: str | None
    amount_crypto: Decimal
    currency: str
    amount_usd: Decimal
    provider_status: str
    actually_paid: Decimal | None
    pay_currency: str | None
    provider_payment_id: str
    since: datetime


class AwaitingSummary(msgspec.Struct, frozen=True, kw_only=True):
    count: int = 0
    oldest_seconds: float = 0.0


class PaymentState(msgspec.Struct, frozen=True, kw_only=True):
    """What nproxyd knows about one invoice's payment (``nproxyd payments show``)."""

    invoice_id: str
    invoice_status: str
    provider: str
    provider_invoice_id: str
    amount_crypto: Decimal
    currency: str
    provider_status: str | None = None
    actually_paid: Decimal | None = None
    pay_currency: str | None = None
    outcome_amount: Decimal | None = None
    outcome_currency: str | None = None
    provider_updated_at: datetime | None = None
    status_since: datetime | None = None
    last_checked_at: datetime | None = None
    last_notified_at: datetime | None = None
    next_check_at: datetime | None = None
    attempts: int | None = None
    last_outcome: str | None = None
    last_error: str | None = None


class StatusHistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    from_status: str | None
    to_status: str
    source: str
    provider_updated_at: datetime | None


class IpnOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How an instant payment notification was handled: ``ok``, ``unknown_payment``,
    ``rejected`` (bad signature) or ``invalid`` (a signed body that cannot be read)."""

    outcome: str
    change: StatusChange | None = None


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    min_check_seconds: float
    max_check_seconds: float

    def after_answer(self, check: PaymentCheck, status: str, now: datetime) -> tuple[datetime, int]:
        """Next check after an answer, and the quiet count: sooner after a change."""
        quiet = 0 if status != check.provider_status else check.quiet_checks + 1
        return now + timedelta(seconds=self._doubled(quiet)), quiet

    def after_failure(self, check: PaymentCheck, now: datetime) -> tuple[datetime, int]:
        """Next check after a transient failure, and the failure count."""
        failures = check.failures + 1
        return now + timedelta(seconds=self._doubled(failures)), failures

    def after_refusal(self, now: datetime) -> datetime:
        """A refused check (401/403/404) is retried only at the slow cadence."""
        return now + timedelta(seconds=self.max_check_seconds)

    def after_rate_limit(self, retry_after_seconds: float, now: datetime) -> datetime:
        return now + timedelta(seconds=max(retry_after_seconds, self.min_check_seconds))

    def _doubled(self, steps: int) -> float:
        exponent = min(max(steps, 0), 32)
        return min(self.max_check_seconds, self.min_check_seconds * float(2**exponent))


def operator_mail(check: PaymentCheck, payment: ProviderPayment, message_id: str) -> OperatorMail:
    """The one mail the operator gets when an invoice first reaches an awaiting status."""
    if payment.status == "finished":
        subject = f"nproxy invoice {check.invoice_id} is paid: activate the subscription"
        action = "Check it and activate the subscription in the admin of the web app."
    else:
        subject = f"nproxy invoice {check.invoice_id} is partially paid: please look at it"
        action = "Only part of the amount arrived: contact the user or adjust in the admin."
    lines = [
        f"The payment provider reports invoice {check.invoice_id} as {payment.status}.",
        f"User: {check.user_email or '-'}",
        f"Plan: {check.plan_code or '-'}",
        f"Invoice amount: {format_amount(check.amount_crypto)} {check.currency}",
        f"Paid: {_amount(payment.actually_paid)} {payment.pay_currency or ''}".rstrip(),
        f"Provider payment id: {payment.payment_id}",
    ]
    if payment.updated_at is not None:
        lines.append(f"Provider updated at: {format_instant(payment.updated_at)}")
    lines += [action, "`nproxyd payments awaiting` lists every invoice that waits."]
    return OperatorMail(subject=subject, body="\n".join(lines) + "\n", message_id=message_id)


def _amount(value: Decimal | None) -> str:
    return "-" if value is None else format_amount(value)


# How far after now a provider's updated_at may lie. Answers are stored newest-first by it, so
# one far in the future (9999-12-31) would make every later answer look older and freeze the
# invoice. An hour is clock skew with margin; more is a wrong or hostile answer.
MAX_FUTURE_UPDATED_AT = timedelta(hours=1)


def answer_problem(payment: ProviderPayment, now: datetime) -> str | None:
    """Why a well-formed answer cannot be recorded at ``now``; ``None`` when it can."""
    if payment.updated_at is not None and payment.updated_at - now > MAX_FUTURE_UPDATED_AT:
        return (
            f"updated_at {format_instant(payment.updated_at)} is more than "
            f"{MAX_FUTURE_UPDATED_AT.total_seconds() / 3600:g} h after now"
        )
    return None
