"""The payment watcher's store: thin calls of the statements in ``sql/payments.sql``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from nproxyd.core.payments import (
    AWAITING_STATUSES,
    FINAL_STATUSES,
    AwaitingInvoice,
    AwaitingSummary,
    CheckResult,
    DueChecks,
    PaymentCheck,
    PaymentState,
    RecordContext,
    StatusChange,
    StatusHistoryEntry,
)
from nproxyd.store.database import Database, affected
from nproxyd.store.rows import convert_rows


class PaymentStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def discover(self, provider: str, now: datetime, grace_hours: float) -> int:
        status = await self.db.execute(
            "discover_payment_invoices", provider, now, grace_hours * 3600
        )
        return affected(status)

    async def due_checks(
        self,
        now: datetime,
        size: int,
        *,
        grace_hours: float,
        lease_until: Callable[[], datetime],
    ) -> AsyncIterator[DueChecks]:
        """Batches of due checks; each claimed row moves to its lease deadline, so paging ends."""
        while True:
            rows = await self.db.fetch(
                "claim_due_payment_checks", now, lease_until(), size, grace_hours * 3600
            )
            followed = [dict(row.items()) for row in rows if row["follow"]]
            checks = [msgspec.convert(row, PaymentCheck) for row in followed]
            yield DueChecks(checks=checks, retired=len(rows) - len(checks))
            if len(rows) < size:
                return

    async def record(
        self, results: Sequence[CheckResult], context: RecordContext
    ) -> list[StatusChange]:
        if not results:
            return []
        rows = await self.db.fetch(
            "record_payment_results", **_columns(results), **_context(context)
        )
        return convert_rows(rows, StatusChange)

    async def track_payment(
        self, provider: str, provider_payment_id: str, now: datetime
    ) -> PaymentCheck | None:
        rows = await self.db.fetch("track_notified_payment", provider, provider_payment_id, now)
        return convert_rows(rows, PaymentCheck)[0] if rows else None

    async def settle_awaiting(self, now: datetime) -> int:
        return len(await self.db.fetch("settle_awaiting_payments", now))

    async def awaiting(self) -> list[AwaitingInvoice]:
        return convert_rows(await self.db.fetch("list_awaiting_payments"), AwaitingInvoice)

    async def awaiting_summary(self, now: datetime) -> AwaitingSummary:
        rows = await self.db.fetch("awaiting_payment_summary", now)
        return convert_rows(rows, AwaitingSummary)[0]

    async def history(self, invoice_id: str) -> list[StatusHistoryEntry]:
        rows = await self.db.fetch("payment_status_history", invoice_id)
        return convert_rows(rows, StatusHistoryEntry)

    async def state(self, invoice_id: str) -> PaymentState | None:
        rows = await self.db.fetch("invoice_payment_state", invoice_id)
        return convert_rows(rows, PaymentState)[0] if rows else None


def _columns(results: Sequence[CheckResult]) -> dict[str, list[Any]]:
    """The array parameters of ``record_payment_results``, one element per result."""

    def payment(attribute: str) -> list[Any]:
        return [getattr(r.payment, attribute) if r.payment else None for r in results]

    def mail(attribute: str) -> list[Any]:
        return [getattr(r.mail, attribute) if r.mail else None for r in results]

    return {
        "invoice_ids": [r.invoice_id for r in results],
        "outcomes": [r.outcome for r in results],
        "payment_ids": payment("payment_id"),
        "statuses": payment("status"),
        "actually_paid": payment("actually_paid"),
        "pay_amounts": payment("pay_amount"),
        "pay_currencies": payment("pay_currency"),
        "outcome_amounts": payment("outcome_amount"),
        "outcome_currencies": payment("outcome_currency"),
        "provider_updated_at": payment("updated_at"),
        "errors": [r.error for r in results],
        "next_check_at": [r.next_check_at for r in results],
        "quiet_checks": [r.quiet_checks for r in results],
        "failures": [r.failures for r in results],
        "mail_subjects": mail("subject"),
        "mail_bodies": mail("body"),
        "mail_message_ids": mail("message_id"),
    }


def _context(context: RecordContext) -> dict[str, Any]:
    return {
        "now": context.now,
        "source": context.source,
        "operator_email": context.operator_email or None,
        "final_statuses": list(FINAL_STATUSES),
        "awaiting_statuses": list(AWAITING_STATUSES),
    }
