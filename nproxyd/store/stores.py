"""Thin stores: run a named statement, convert rows with msgspec, return.

Business rules live in the actors, in pure functions, or in the set-based statement itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from nproxyd.core.rules import RENEWAL_SUBJECT
from nproxyd.store.database import Database, affected
from nproxyd.store.rows import (
    ClaimedSlot,
    CompletedSlot,
    DeadMail,
    ExpiryBatch,
    HealthGauges,
    KeyRow,
    KeyTransition,
    LatestFailures,
    MailOutcome,
    OutboxCounts,
    OutboxMail,
    ReleasedSlot,
    RenewalCandidate,
    StoredInvoice,
    convert_rows,
)


class InvoiceStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def expire_batch(
        self, now: datetime, after: tuple[datetime, str], limit: int
    ) -> ExpiryBatch:
        rows = await self.db.fetch("expire_pending_invoices", now, after[0], after[1], limit)
        return convert_rows(rows, ExpiryBatch)[0]


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def recover(self, now: datetime) -> list[str]:
        rows = await self.db.fetch("recover_cooldown_keys", now)
        return [row["id"] for row in rows]

    async def claim_balance_due(
        self, now: datetime, poll_seconds: float, limit: int
    ) -> list[KeyRow]:
        rows = await self.db.fetch("claim_balance_due_keys", now, poll_seconds, limit)
        return convert_rows(rows, KeyRow)

    async def record_balances(
        self, ids: Sequence[str], balances: Sequence[Decimal], now: datetime
    ) -> None:
        await self.db.execute("record_key_balances", list(ids), list(balances), now)

    async def record_failures(
        self,
        ids: Sequence[str],
        errors: Sequence[str],
        now: datetime,
        *,
        cooldown_minutes: float,
        failures_before_manual_review: int,
    ) -> list[KeyTransition]:
        rows = await self.db.fetch(
            "record_key_failures",
            list(ids),
            list(errors),
            now,
            cooldown_minutes,
            failures_before_manual_review,
        )
        return convert_rows(rows, KeyTransition)

    async def record_successes(self, ids: Sequence[str], now: datetime) -> int:
        return affected(await self.db.execute("record_key_successes", list(ids), now))

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetch("provider_key_counts")
        return {row["status"]: row["count"] for row in rows}


class RenewalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def candidates(
        self, now: datetime, window_end: datetime, after: tuple[datetime, str], limit: int
    ) -> list[RenewalCandidate]:
        rows = await self.db.fetch("renewal_candidates", now, window_end, after[0], after[1], limit)
        return convert_rows(rows, RenewalCandidate)

    async def claim(
        self,
        slots: Sequence[tuple[str, datetime, str]],
        *,
        holder: str,
        token: str,
        now: datetime,
        lease_until: datetime,
    ) -> list[ClaimedSlot]:
        rows = await self.db.fetch(
            "claim_renewal_slots",
            [slot[0] for slot in slots],
            [slot[1] for slot in slots],
            [slot[2] for slot in slots],
            holder,
            token,
            now,
            lease_until,
        )
        return convert_rows(rows, ClaimedSlot)

    async def commit(
        self, invoices: Sequence[StoredInvoice], *, provider: str, now: datetime
    ) -> list[CompletedSlot]:
        columns = [
            [getattr(invoice, field) for invoice in invoices]
            for field in StoredInvoice.__struct_fields__
        ]
        rows = await self.db.fetch(
            "commit_renewal_invoices", *columns, provider, now, RENEWAL_SUBJECT
        )
        return convert_rows(rows, CompletedSlot)

    async def extend(self, token: str, lease_until: datetime) -> int:
        return affected(await self.db.execute("extend_renewal_claims", token, lease_until))

    async def release(self, slots: Sequence[ReleasedSlot], now: datetime) -> int:
        columns = [
            [getattr(slot, field) for slot in slots] for field in ReleasedSlot.__struct_fields__
        ]
        return affected(await self.db.execute("release_renewal_claims", *columns, now))


class OutboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(
        self, now: datetime, lease_until: datetime, holder: str, limit: int
    ) -> list[OutboxMail]:
        rows = await self.db.fetch("claim_due_mail", now, lease_until, holder, limit)
        return convert_rows(rows, OutboxMail)

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int:
        columns = [
            [getattr(outcome, field) for outcome in outcomes]
            for field in MailOutcome.__struct_fields__
        ]
        return affected(await self.db.execute("record_mail_outcomes", *columns, now, holder))

    async def extend(self, ids: Sequence[str], holder: str, lease_until: datetime) -> int:
        return affected(await self.db.execute("extend_mail_leases", list(ids), holder, lease_until))

    async def enqueue(
        self,
        *,
        to_address: str,
        subject: str,
        body: str,
        message_id: str,
        dedupe_key: str | None,
        now: datetime,
    ) -> str | None:
        result: str | None = await self.db.fetchval(
            "enqueue_mail", to_address, subject, body, message_id, dedupe_key, now
        )
        return result

    async def dead(self, limit: int) -> list[DeadMail]:
        return convert_rows(await self.db.fetch("list_dead_mail", limit), DeadMail)

    async def retry(self, ids: Sequence[str] | None, now: datetime) -> list[str]:
        if ids is None:
            rows = await self.db.fetch("retry_all_dead_mail", now)
        else:
            rows = await self.db.fetch("retry_dead_mail", list(ids), now)
        return [row["id"] for row in rows]

    async def counts(self) -> OutboxCounts:
        return convert_rows(await self.db.fetch("outbox_counts"), OutboxCounts)[0]


class HealthStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ping(self) -> bool:
        return bool(await self.db.fetchval("ping"))

    async def gauges(self, now: datetime) -> HealthGauges:
        return convert_rows(await self.db.fetch("health_gauges", now), HealthGauges)[0]

    async def latest_failures(self) -> LatestFailures:
        return convert_rows(await self.db.fetch("latest_failures"), LatestFailures)[0]
