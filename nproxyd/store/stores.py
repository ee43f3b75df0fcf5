"""Thin stores: run a named statement, convert rows with msgspec, return.

Business rules live in the actors, in pure functions, or in the set-based statement itself.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from decimal import Decimal

import anyio

from nproxyd.core.errors import LockUnavailable
from nproxyd.core.records import (
    ClaimedSlot,
    CompletedSlot,
    DeadMail,
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
    UnreadableCandidate,
)
from nproxyd.core.rules import RENEWAL_SUBJECT
from nproxyd.store.database import Database, affected
from nproxyd.store.rows import (
    KEYSET_START,
    ExpiryBatch,
    ExpirySurvey,
    convert_candidates,
    convert_rows,
)


class InvoiceStore:
    """Expiry of due pending invoices; implements :class:`nproxyd.core.ports.ExpiryStore`.

    When many invoices are due (at least ``SWEEP_DUE_PER_PAGE`` per heap page), the table is
    swept in physical order, a range of pages per statement: each page is read once, in order,
    as one UPDATE would. Otherwise, and for what a sweep left (rows locked at the time, rows
    other writers updated or added meanwhile), keyset batches walk the partial index of due
    rows. Either way every statement takes at most ``batch_size`` rows and skips rows locked
    by others.

    The pass after a sweep goes through the index because nothing else is sure to find what
    the sweep missed: another writer's new row version goes to any page with room (its cached
    target page, a page the free space map lists, a new page), also one already swept.
    """

    SWEEP_DUE_PER_PAGE = 4
    # Page ranges swept at once: the single UPDATE it competes with uses one core, a sweep
    # can use two; more would only take more of the pool and of the server's cores.
    SWEEPERS = 2
    RANGE_LOCK_TIMEOUT = "50ms"  # a page range waits no longer for a row locked by others
    _ROWS_PER_PAGE_GUESS = 60  # before the table was ever analysed

    def __init__(self, db: Database) -> None:
        self.db = db

    async def expire_due(self, now: datetime, batch_size: int) -> AsyncIterator[int]:
        """Expire every pending invoice due at ``now``; yields the count of each statement."""
        rows = await self.db.fetch("expiry_survey", now, self.SWEEP_DUE_PER_PAGE)
        survey = convert_rows(rows, ExpirySurvey)[0]
        if survey.due == 0:
            return
        if survey.pages and survey.due >= survey.pages * self.SWEEP_DUE_PER_PAGE:
            async for expired in self._sweep(now, survey, batch_size):
                yield expired
        async for expired in self._keyset(now, batch_size):
            yield expired

    async def _sweep(
        self, now: datetime, survey: ExpirySurvey, batch_size: int
    ) -> AsyncIterator[int]:
        """Sweep the table's pages in order, in ranges of about ``batch_size`` rows,
        ``SWEEPERS`` neighbouring ranges at a time, each on its own connection.

        Each range is one short transaction: the ranges of a round touch different pages, so
        they never wait for each other, and a concurrent writer waits for one range at most.
        The rounds' tasks end before their counts are yielded (no task outlives a ``yield``).
        """
        density = survey.tuples / survey.pages if survey.tuples else self._ROWS_PER_PAGE_GUESS
        step = max(1, int(batch_size / max(density, 1.0)))
        for start in range(0, survey.pages, step * self.SWEEPERS):
            firsts = range(start, min(start + step * self.SWEEPERS, survey.pages), step)
            ranges = [(first, min(first + step, survey.pages)) for first in firsts]
            for expired in await self._sweep_round(now, ranges, batch_size):
                yield expired

    async def _sweep_round(
        self, now: datetime, ranges: list[tuple[int, int]], batch_size: int
    ) -> list[int]:
        """Expire the page ranges at once; the count of each statement."""
        counts: list[int] = []

        async def sweep(first: int, last: int) -> None:
            counts.extend(await self._sweep_range(now, first, last, batch_size))

        async with anyio.create_task_group() as sweepers:
            for first, last in ranges:
                sweepers.start_soon(sweep, first, last, name=f"expiry-pages-{first}")
        return counts

    async def _sweep_range(
        self, now: datetime, first: int, last: int, batch_size: int
    ) -> list[int]:
        """Pages [first, last): one plain UPDATE, or skip-locked batches if a row is locked."""
        try:
            return [await self._expire_range(now, first, last)]
        except LockUnavailable:
            return [
                expired
                async for expired in self._expire_range_skipping_locked(
                    now, first, last, batch_size
                )
            ]

    async def _expire_range(self, now: datetime, first: int, last: int) -> int:
        """One plain UPDATE of a page range: each row written once, as one big UPDATE does."""
        async with self.db.transaction() as transaction:
            await transaction.fetch("set_lock_timeout", self.RANGE_LOCK_TIMEOUT)
            status = await transaction.execute(
                "expire_pending_invoices_in_page_range", now, (first, 0), (last, 0)
            )
        return affected(status)

    async def _expire_range_skipping_locked(
        self, now: datetime, first: int, last: int, batch_size: int
    ) -> AsyncIterator[int]:
        """A page range holding a locked row: lock what is free, skip the rest."""
        while True:
            rows = await self.db.fetch(
                "expire_pending_invoices_in_pages", now, (first, 0), (last, 0), batch_size
            )
            batch = convert_rows(rows, ExpiryBatch)[0]
            yield batch.expired
            if batch.scanned < batch_size:
                return

    async def _keyset(self, now: datetime, batch_size: int) -> AsyncIterator[int]:
        after, after_id = "-infinity", ""
        while True:
            rows = await self.db.fetch("expire_pending_invoices", now, after, after_id, batch_size)
            batch = convert_rows(rows, ExpiryBatch)[0]
            yield batch.expired
            if batch.scanned < batch_size or batch.last_id is None:
                return
            after, after_id = batch.last_expires_at or after, batch.last_id


class KeyStore:
    """Provider keys; implements :class:`nproxyd.core.ports.KeyPoolStore`."""

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
            ids=list(ids),
            errors=list(errors),
            now=now,
            cooldown_minutes=cooldown_minutes,
            failures_before_manual_review=failures_before_manual_review,
        )
        return convert_rows(rows, KeyTransition)

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetch("provider_key_counts")
        return {row["status"]: row["count"] for row in rows}


class RenewalStore:
    """Renewal candidates, claims and grouped commits; implements
    :class:`nproxyd.core.ports.RenewalClaimStore`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def due_candidates(
        self,
        now: datetime,
        window_end: datetime,
        size: int,
        *,
        after: tuple[datetime, str] = KEYSET_START,
    ) -> AsyncIterator[list[RenewalCandidate | UnreadableCandidate]]:
        """Every candidate due in ``(now, window_end]`` whose (period end, id) comes after
        ``after``, one keyset batch of ``size`` per query.

        The caller may claim a batch before it asks for the next: the keyset continues after
        the last row read, whatever was written since.
        """
        cursor = after
        while True:
            batch = await self.candidates(now, window_end, cursor, size)
            if batch:
                cursor = (batch[-1].current_period_end, batch[-1].subscription_id)
                yield batch
            if len(batch) < size:
                return

    async def candidates(
        self, now: datetime, window_end: datetime, after: tuple[datetime, str], limit: int
    ) -> list[RenewalCandidate | UnreadableCandidate]:
        rows = await self.db.fetch(
            "renewal_candidates",
            now=now,
            window_end=window_end,
            after_period_end=after[0],
            after_id=after[1],
            size=limit,
        )
        return convert_candidates(rows)

    async def retry_floor(self, now: datetime, window_end: datetime) -> datetime | None:
        """The earliest period end in the window whose cycle has an open claim available at
        ``now`` (a retry due, a lease elapsed), or None."""
        floor: datetime | None = await self.db.fetchval("renewal_retry_floor", now, window_end)
        return floor

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
            subscription_ids=[slot[0] for slot in slots],
            cycle_starts=[slot[1] for slot in slots],
            order_ids=[slot[2] for slot in slots],
            holder=holder,
            token=token,
            now=now,
            lease_until=lease_until,
        )
        return convert_rows(rows, ClaimedSlot)

    async def commit(
        self, invoices: Sequence[StoredInvoice], *, provider: str, now: datetime
    ) -> list[CompletedSlot]:
        rows = await self.db.fetch(
            "commit_renewal_invoices",
            subscription_ids=[invoice.subscription_id for invoice in invoices],
            cycle_starts=[invoice.cycle_start for invoice in invoices],
            tokens=[invoice.token for invoice in invoices],
            invoice_ids=[invoice.invoice_id for invoice in invoices],
            user_ids=[invoice.user_id for invoice in invoices],
            provider_invoice_ids=[invoice.provider_invoice_id for invoice in invoices],
            currencies=[invoice.currency for invoice in invoices],
            amounts=[invoice.amount for invoice in invoices],
            payment_addresses=[invoice.payment_address for invoice in invoices],
            expires_at=[invoice.expires_at for invoice in invoices],
            to_addresses=[invoice.to_address for invoice in invoices],
            bodies=[invoice.body for invoice in invoices],
            message_ids=[invoice.message_id for invoice in invoices],
            provider=provider,
            now=now,
            subject=RENEWAL_SUBJECT,
        )
        return convert_rows(rows, CompletedSlot)

    async def extend(self, token: str, lease_until: datetime) -> int:
        return affected(await self.db.execute("extend_renewal_claims", token, lease_until))

    async def release(self, slots: Sequence[ReleasedSlot], now: datetime) -> int:
        status = await self.db.execute(
            "release_renewal_claims",
            subscription_ids=[slot.subscription_id for slot in slots],
            cycle_starts=[slot.cycle_start for slot in slots],
            tokens=[slot.token for slot in slots],
            states=[slot.state for slot in slots],
            available_at=[slot.available_at for slot in slots],
            errors=[slot.error for slot in slots],
            now=now,
        )
        return affected(status)


class OutboxStore:
    """The mail outbox; implements :class:`nproxyd.core.ports.MailOutboxStore`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(
        self, now: datetime, lease_until: datetime, holder: str, limit: int
    ) -> list[OutboxMail]:
        rows = await self.db.fetch("claim_due_mail", now, lease_until, holder, limit)
        return convert_rows(rows, OutboxMail)

    async def due_mail(
        self, now: datetime, size: int, *, holder: str, lease_until: Callable[[], datetime]
    ) -> AsyncGenerator[list[OutboxMail], None]:
        """Lease the mail due at ``now``, ``size`` rows per statement, until none is left.

        Each batch is leased to ``holder`` until ``lease_until()`` (asked per batch); the
        caller may ask for the next batch while it delivers one (the rows it holds stay leased,
        so they are never returned twice), and may stop early.
        """
        while True:
            batch = await self.claim(now, lease_until(), holder, size)
            if batch:
                yield batch
            if len(batch) < size:
                return

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int:
        """Record ``outcomes`` in one statement; raises :class:`StoreDataError` on a bad value."""
        return affected(
            await self.db.execute(
                "record_mail_outcomes",
                ids=[outcome.id for outcome in outcomes],
                statuses=[outcome.status for outcome in outcomes],
                errors=[outcome.error for outcome in outcomes],
                next_attempt_at=[outcome.next_attempt_at for outcome in outcomes],
                counts_attempt=[outcome.counts_attempt for outcome in outcomes],
                now=now,
                holder=holder,
            )
        )

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
            "enqueue_mail",
            to_address=to_address,
            subject=subject,
            body=body,
            message_id=message_id,
            dedupe_key=dedupe_key,
            now=now,
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
    """Health gauges; implements :class:`nproxyd.core.ports.HealthReadStore`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def ping(self) -> bool:
        return bool(await self.db.fetchval("ping"))

    async def gauges(self, now: datetime) -> HealthGauges:
        return convert_rows(await self.db.fetch("health_gauges", now), HealthGauges)[0]

    async def latest_failures(self) -> LatestFailures:
        return convert_rows(await self.db.fetch("latest_failures"), LatestFailures)[0]
