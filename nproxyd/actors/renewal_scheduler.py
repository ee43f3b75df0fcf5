"""Renewal scheduler: one renewal invoice per paid cycle, claimed in the database first.

A tick reads due subscriptions in keyset batches, claims their (subscription, cycle) slots in
one statement, calls the payment provider for the slots it won (bounded concurrency), and
commits each group of answers in one statement (two groups at a time): invoice, outbox mail
and claim completion together. A crash anywhere leaves a claim whose lease elapses; the next
tick of any instance takes it over with the same provider ``order_id``.

Bad data never stalls a batch: a candidate that cannot be invoiced (a cycle start Python cannot
represent, a bad plan, an address nproxyd can never deliver to) is skipped before any provider
call; a group whose commit fails on its data is halved until the one slot it fails on is alone,
and that slot is released ``failed`` so the good ones are stored.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TypeVar

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from nproxyd.actors.leases import LeaseDeadlines, kept_alive
from nproxyd.core.channels import Outbox
from nproxyd.core.clock import Clock
from nproxyd.core.errors import ProviderError, ProviderPermanentError, StoreDataError
from nproxyd.core.messages import OutboxReady, RenewalReport
from nproxyd.core.ports import (
    InvoiceRequest,
    PaymentProvider,
    ProviderInvoice,
    RenewalClaimStore,
)
from nproxyd.core.records import (
    ClaimedSlot,
    CompletedSlot,
    ReleasedSlot,
    RenewalCandidate,
    StoredInvoice,
    UnreadableCandidate,
)
from nproxyd.core.rules import (
    backoff_seconds,
    candidate_problem,
    message_id,
    message_id_domain,
    order_id,
    random_uuid,
    render_renewal_body,
)
from nproxyd.core.text import storable

_COMMIT_GROUP = 500
# Groups committed at once: one is in the server while the next is encoded and sent, and the
# database's work spreads over two backends. More only hold more connections.
_COMMITTERS = 2
_MICROSECOND = timedelta(microseconds=1)  # PostgreSQL's timestamp resolution, and Python's
_LOG_AGAIN_AFTER = timedelta(hours=1)  # a warning about one bad row, at most this often
_MEMO_SIZE = 10_000  # rows remembered for that; the oldest are forgotten first
T = TypeVar("T")
SlotResult = StoredInvoice | ReleasedSlot  # what a provider call left for its claimed slot


class RenewalSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``[actors.renewal_scheduler]``, ``[billing]``, the app's URL, the sender, the instance."""

    interval_seconds: float
    batch_size: int
    renewal_lead_time_hours: float
    provider_concurrency: int
    claim_lease_seconds: float
    failed_retry_hours: float
    retry_base_seconds: float
    retry_max_seconds: float
    app_base_url: str
    from_address: str
    instance_id: str
    full_pass_seconds: float = 3600.0


class RenewalPorts(msgspec.Struct, frozen=True, kw_only=True):
    store: RenewalClaimStore
    provider: PaymentProvider
    outbox: Outbox


class _Totals:
    def __init__(self) -> None:
        self.candidates = self.claimed = self.created = self.superseded = 0
        self.skipped = self.transient = self.permanent = self.unreleasable = 0
        self.skipped_reasons: dict[str, int] = {}

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skipped_reasons[reason] = self.skipped_reasons.get(reason, 0) + 1

    def report(self) -> RenewalReport:
        return RenewalReport(
            candidates=self.candidates,
            claimed=self.claimed,
            created_count=self.created,
            superseded=self.superseded,
            skipped_bad=self.skipped,
            skipped_reasons=dict(self.skipped_reasons),
            transient_failures=self.transient,
            permanent_failures=self.permanent,
            unreleasable=self.unreleasable,
        )


class LogMemo:
    """When a warning about each row was last logged, so one bad row is not logged every tick.

    Bounded: past ``size`` rows the least recently logged are forgotten (and may be logged
    again). A changed reason, or a ``now`` before the last one, logs again.
    """

    def __init__(self, every: timedelta = _LOG_AGAIN_AFTER, size: int = _MEMO_SIZE) -> None:
        self.every = every
        self.size = size
        self._logged: OrderedDict[str, tuple[datetime, str]] = OrderedDict()

    def due(self, key: str, reason: str, now: datetime) -> bool:
        """True when a warning about ``key`` should be logged now (and remembers it)."""
        last = self._logged.get(key)
        if last is not None and last[1] == reason and last[0] <= now < last[0] + self.every:
            return False
        self._logged[key] = (now, reason)
        self._logged.move_to_end(key)
        while len(self._logged) > self.size:
            self._logged.popitem(last=False)
        return True


class Watermark:
    """How far this process has examined the renewal window (docs/design.md §2, renewal).

    Every subscription whose period end lies at or below ``through`` was examined by an earlier
    tick of this process and resolved: invoiced (by nproxyd or the web API), its claim done,
    or not eligible. A slot left unresolved has an open claim (a retry, a lease held by
    another instance or left by a crash): once it is available again, the tick reads the
    window from its period end on (:meth:`RenewalClaimStore.retry_floor`). A full pass every
    ``full_pass_every`` (and at start, and when the clock went back) catches what the web API
    changed in the window after it was examined. Only an optimisation: claims still arbitrate
    between instances, and losing it costs one full pass.
    """

    def __init__(self, full_pass_every: timedelta) -> None:
        self.full_pass_every = full_pass_every
        self.through: datetime | None = None
        self.full_pass_at: datetime | None = None
        self.last_now: datetime | None = None

    def through_at(self, now: datetime) -> datetime | None:
        """The mark a tick at ``now`` may read after; None when a full pass is due."""
        if self.through is None or self.full_pass_at is None or self.last_now is None:
            return None
        if now < self.last_now or now >= self.full_pass_at + self.full_pass_every:
            return None
        return self.through

    def examined(self, now: datetime, window_end: datetime, *, full: bool) -> None:
        """A tick at ``now`` read the window up to ``window_end`` and returned."""
        self.through = window_end
        self.last_now = now
        if full:
            self.full_pass_at = now


class _Run:
    """What one tick's producer, provider workers and committer share."""

    def __init__(self, token: str, leases: LeaseDeadlines, totals: _Totals) -> None:
        self.token = token
        self.leases = leases
        self.now = leases.now
        self.totals = totals


Work = tuple[RenewalCandidate, ClaimedSlot]
Batch = list[RenewalCandidate | UnreadableCandidate]


async def _put(stream: MemoryObjectSendStream[T], item: T) -> None:
    """Send ``item``; waits (and yields to the event loop) only when the buffer is full.

    A hand-off that fits needs no trip through the event loop: with thousands of slots per
    tick those trips were a large share of the scheduler's CPU time.
    """
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


async def _taken(stream: MemoryObjectReceiveStream[T]) -> T | None:
    """The next item of ``stream``, waiting only when it is empty; None once it is closed."""
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        pass
    except anyio.EndOfStream:
        return None
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return None


class RenewalScheduler:
    name = "renewal-scheduler"

    def __init__(
        self,
        settings: RenewalSettings,
        ports: RenewalPorts,
        clock: Clock,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = ports.store
        self.provider = ports.provider
        self.outbox = ports.outbox
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.interval_seconds = settings.interval_seconds
        self.log = structlog.get_logger().bind(actor=self.name)
        self.skip_memo = LogMemo()
        self.watermark = Watermark(timedelta(seconds=settings.full_pass_seconds))
        # A renewal mail's Message-ID is its invoice's uuid in the sender's domain.
        self.message_domain = message_id_domain(settings.from_address)

    async def tick(self, now: datetime) -> RenewalReport:
        """Read the window after the watermark (all of it on a full pass), then advance it.

        A tick that raises leaves the watermark where it was, so its range is read again.
        """
        window_end = now + timedelta(hours=self.settings.renewal_lead_time_hours)
        start = await self._scan_start(now, window_end)
        report = await self._run(now, window_end, start)
        self.watermark.examined(now, window_end, full=start is None)
        return report

    async def _scan_start(self, now: datetime, window_end: datetime) -> datetime | None:
        """The earliest period end this tick must read; None for a full pass."""
        through = self.watermark.through_at(now)
        if through is None:
            return None
        start = through + _MICROSECOND
        floor = await self.store.retry_floor(now, window_end)
        return start if floor is None else min(start, floor)

    async def _run(
        self, now: datetime, window_end: datetime, start: datetime | None
    ) -> RenewalReport:
        """A pipeline: read and claim batches -> provider workers -> grouped commits.

        The next batch is read and claimed while the provider calls of the previous one run,
        so a batch boundary never leaves the provider idle. Reads period ends from ``start``
        on (keyset position (start, ""): every id comes after ""), or all of them.
        """
        leases = LeaseDeadlines(self.clock, now, self.settings.claim_lease_seconds)
        run = _Run(uuid.uuid4().hex, leases, _Totals())
        size = self.settings.batch_size
        candidates = (
            self.store.due_candidates(now, window_end, size)
            if start is None
            else self.store.due_candidates(now, window_end, size, after=(start, ""))
        )
        batches = aiter(candidates)
        first: Batch = await anext(batches, [])
        if not first:  # nothing due: no pipeline, no lease keeper, no provider workers
            return run.totals.report()

        async def extend(until: datetime) -> int:
            return await self.store.extend(run.token, until)

        work_send, work_receive = anyio.create_memory_object_stream[Work](size)
        result_send, result_receive = anyio.create_memory_object_stream[SlotResult](size)
        async with (
            kept_alive(leases, extend, what="renewal-claims"),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._commit_loop, result_receive, run, name="renewal-commit")
            async with result_send, work_receive, anyio.create_task_group() as workers:
                for number in range(self.settings.provider_concurrency):
                    workers.start_soon(
                        self._worker,
                        work_receive.clone(),
                        result_send.clone(),
                        run,
                        name=f"renewal-provider-{number}",
                    )
                async with work_send:
                    await self._produce(work_send, run, first, batches)
        if run.totals.created:
            self.log.info("renewal_invoices_created", created_count=run.totals.created)
        return run.totals.report()

    async def _produce(
        self,
        work: MemoryObjectSendStream[Work],
        run: _Run,
        first: Batch,
        rest: AsyncIterator[Batch],
    ) -> None:
        """Claim each batch of due candidates, hand the won slots to the workers."""
        batch = first
        while batch:
            run.totals.candidates += len(batch)
            for pair in await self._claim(self._valid(batch, run), run):
                await _put(work, pair)
            batch = await anext(rest, [])

    def _valid(
        self, batch: list[RenewalCandidate | UnreadableCandidate], run: _Run
    ) -> list[RenewalCandidate]:
        """The candidates that can be invoiced; the others are counted and logged by id."""
        valid: list[RenewalCandidate] = []
        for candidate in batch:
            problem: str | None
            if isinstance(candidate, UnreadableCandidate):
                problem = f"{candidate.column} is not a representable timestamp"
            else:
                problem = candidate_problem(
                    email=candidate.email,
                    price=candidate.monthly_price_usd,
                    currency=candidate.billing_currency,
                )
                if problem is None:
                    valid.append(candidate)
                    continue
            run.totals.skip(problem)
            if self.skip_memo.due(candidate.subscription_id, problem, run.now):
                self.log.warning(
                    "renewal_candidate_skipped",
                    subscription_id=candidate.subscription_id,
                    reason=problem,
                )
        return valid

    async def _claim(self, valid: list[RenewalCandidate], run: _Run) -> list[Work]:
        if not valid:
            return []
        claimed = await self.store.claim(
            [
                (c.subscription_id, c.cycle_start, order_id(c.subscription_id, c.cycle_start))
                for c in valid
            ],
            holder=self.settings.instance_id,
            token=run.token,
            now=run.now,
            lease_until=run.leases.deadline(),
        )
        run.totals.claimed += len(claimed)
        by_slot = {(c.subscription_id, c.cycle_start): c for c in valid}
        return [(by_slot[(s.subscription_id, s.cycle_start)], s) for s in claimed]

    async def _worker(
        self,
        work: MemoryObjectReceiveStream[Work],
        results: MemoryObjectSendStream[SlotResult],
        run: _Run,
    ) -> None:
        async with work, results:
            while (item := await _taken(work)) is not None:
                await _put(results, await self._request(*item, run))

    async def _request(
        self, candidate: RenewalCandidate, slot: ClaimedSlot, run: _Run
    ) -> SlotResult:
        try:
            request = self._request_for(candidate, slot)
            answer = await self.provider.create_invoice(request, run.now)
            return self._stored(candidate, slot, run.token, answer)
        except ProviderPermanentError as exc:
            run.totals.permanent += 1
            return self._failed(slot, run.token, run.now, exc.message)
        except ProviderError as exc:  # anything else is a bug: it fails the tick
            run.totals.transient += 1
            return self._retry(candidate, slot, run.token, run.now, exc)

    def _request_for(self, candidate: RenewalCandidate, slot: ClaimedSlot) -> InvoiceRequest:
        assert candidate.monthly_price_usd is not None and candidate.billing_currency
        return InvoiceRequest(
            order_id=slot.order_id,
            subscription_id=candidate.subscription_id,
            user_id=candidate.user_id,
            plan_code=candidate.plan_code,
            amount_usd=candidate.monthly_price_usd,
            currency=candidate.billing_currency,
            description=f"nproxy {candidate.plan_code} renewal",
        )

    def _stored(
        self,
        candidate: RenewalCandidate,
        slot: ClaimedSlot,
        token: str,
        answer: ProviderInvoice,
    ) -> StoredInvoice:
        if not answer.provider_invoice_id:
            raise ProviderPermanentError(
                f"the provider returned no invoice id for order {slot.order_id}"
            )
        assert candidate.monthly_price_usd is not None and candidate.billing_currency
        assert candidate.email is not None
        amount = candidate.monthly_price_usd
        # The invoice's id, and unique enough for its mail's Message-ID.
        ident, ident_hex = random_uuid()
        body = render_renewal_body(
            period_end=candidate.current_period_end,
            amount=amount,
            currency=candidate.billing_currency,
            payment_address=answer.payment_address,
            expires_at=answer.expires_at,
            app_base_url=self.settings.app_base_url,
        )
        return StoredInvoice(
            subscription_id=slot.subscription_id,
            cycle_start=slot.cycle_start,
            token=token,
            invoice_id=ident,
            user_id=candidate.user_id,
            provider_invoice_id=answer.provider_invoice_id,
            currency=candidate.billing_currency,
            amount=amount,
            payment_address=answer.payment_address,
            expires_at=answer.expires_at,
            to_address=candidate.email,
            body=body,
            message_id=message_id(ident_hex, self.message_domain),
        )

    def _failed(self, slot: ClaimedSlot, token: str, now: datetime, reason: str) -> ReleasedSlot:
        reason = storable(reason)
        self.log.warning(
            "renewal_invoice_failed",
            subscription_id=slot.subscription_id,
            order_id=slot.order_id,
            reason=reason,
        )
        retry_at = now + timedelta(hours=self.settings.failed_retry_hours)
        return self._released(slot, token, "failed", retry_at, reason)

    def _retry(
        self,
        candidate: RenewalCandidate,
        slot: ClaimedSlot,
        token: str,
        now: datetime,
        exc: Exception,
    ) -> ReleasedSlot:
        reason = storable(f"{type(exc).__name__}: {exc}")
        delay = backoff_seconds(
            slot.attempts,
            base_seconds=self.settings.retry_base_seconds,
            cap_seconds=self.settings.retry_max_seconds,
            rng=self.rng,
        )
        self.log.warning(
            "renewal_invoice_retry_scheduled",
            subscription_id=candidate.subscription_id,
            order_id=slot.order_id,
            attempts=slot.attempts,
            retry_in_seconds=round(delay, 1),
            reason=reason,
        )
        return self._released(slot, token, "retry", now + timedelta(seconds=delay), reason)

    @staticmethod
    def _released(
        slot: ClaimedSlot, token: str, state: str, available_at: datetime, error: str
    ) -> ReleasedSlot:
        return ReleasedSlot(
            subscription_id=slot.subscription_id,
            cycle_start=slot.cycle_start,
            token=token,
            state=state,
            available_at=available_at,
            error=storable(error),
        )

    async def _commit_loop(
        self, receiver: MemoryObjectReceiveStream[SlotResult], run: _Run
    ) -> None:
        """Commit results in groups, ``_COMMITTERS`` groups at a time.

        A group is taken only when a committer is free, so it holds everything that arrived
        while the others were busy (whole claimed batches when the provider answers fast).
        """
        free = anyio.Semaphore(_COMMITTERS)
        async with receiver, anyio.create_task_group() as committers:
            while True:
                await free.acquire()
                group = await self._group(receiver)
                if not group:
                    free.release()
                    return
                committers.start_soon(
                    self._commit_then_free, group, run, free, name="renewal-commit-group"
                )

    @staticmethod
    async def _group(receiver: MemoryObjectReceiveStream[SlotResult]) -> list[SlotResult]:
        """The next result (waiting for it) and up to a group's worth of those already there."""
        first = await _taken(receiver)
        if first is None:
            return []
        group = [first]
        while len(group) < _COMMIT_GROUP:
            try:
                group.append(receiver.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return group

    async def _commit_then_free(
        self, group: list[SlotResult], run: _Run, free: anyio.Semaphore
    ) -> None:
        try:
            await self._commit(group, run.now, run.totals)
        finally:
            free.release()

    async def _commit(self, group: list[SlotResult], now: datetime, totals: _Totals) -> None:
        invoices = [item for item in group if isinstance(item, StoredInvoice)]
        released = [item for item in group if isinstance(item, ReleasedSlot)]
        if invoices:
            released.extend(await self._store(invoices, now, totals))
        if released:
            await self._release(released, now, totals)

    async def _store(
        self, invoices: list[StoredInvoice], now: datetime, totals: _Totals
    ) -> list[ReleasedSlot]:
        """Commit ``invoices``; returns the slots to release because their data cannot be stored.

        A group that fails on its data is halved until the slot it fails on is alone, so one
        poison answer costs a few statements, not the group.
        """
        try:
            completed = await self.store.commit(invoices, provider=self.provider.name, now=now)
        except StoreDataError as exc:
            if len(invoices) == 1:
                totals.permanent += 1
                return [self._unstorable(invoices[0], now, exc)]
            half = len(invoices) // 2
            first = await self._store(invoices[:half], now, totals)
            return first + await self._store(invoices[half:], now, totals)
        self._created(invoices, completed, totals)
        return []

    def _created(
        self, invoices: list[StoredInvoice], completed: list[CompletedSlot], totals: _Totals
    ) -> None:
        created = sum(1 for slot in completed if not slot.superseded)
        totals.superseded += len(completed) - created
        totals.created += created
        if self.log.is_enabled_for(logging.DEBUG):  # one event per invoice: skipped cheaply
            self._log_created(invoices, completed)
        if created:
            self.outbox.offer(OutboxReady(count=created))

    def _log_created(self, invoices: list[StoredInvoice], completed: list[CompletedSlot]) -> None:
        by_subscription = {invoice.subscription_id: invoice for invoice in invoices}
        for slot in completed:
            if slot.superseded:
                continue
            invoice = by_subscription[slot.subscription_id]
            self.log.debug(
                "renewal_invoice_created",
                invoice_id=invoice.invoice_id,
                subscription_id=invoice.subscription_id,
                order_id=order_id(invoice.subscription_id, invoice.cycle_start),
            )

    def _unstorable(
        self, invoice: StoredInvoice, now: datetime, exc: StoreDataError
    ) -> ReleasedSlot:
        reason = f"unstorable provider answer (payment {invoice.provider_invoice_id}): {exc}"
        slot = ClaimedSlot(
            subscription_id=invoice.subscription_id,
            cycle_start=invoice.cycle_start,
            order_id=order_id(invoice.subscription_id, invoice.cycle_start),
            attempts=0,
        )
        return self._failed(slot, invoice.token, now, reason)

    async def _release(self, slots: list[ReleasedSlot], now: datetime, totals: _Totals) -> None:
        """Release ``slots``; halves a group that fails on its data, like :meth:`_store`."""
        try:
            await self.store.release(slots, now)
        except StoreDataError as exc:
            if len(slots) == 1:
                await self._release_plainly(slots[0], now, totals, exc)
                return
            half = len(slots) // 2
            await self._release(slots[:half], now, totals)
            await self._release(slots[half:], now, totals)

    async def _release_plainly(
        self, slot: ReleasedSlot, now: datetime, totals: _Totals, exc: StoreDataError
    ) -> None:
        """Release one slot with a fixed reason; a slot even that fails for is counted, logged."""
        plain = msgspec.structs.replace(
            slot, error=f"{slot.state}: the reason could not be stored ({exc})"
        )
        try:
            await self.store.release([plain], now)
        except StoreDataError as again:
            error = again.message
        else:
            return
        # Its lease elapses and a later tick tries it again: loud, never silent.
        totals.unreleasable += 1
        self.log.error(
            "renewal_claim_unreleasable",
            subscription_id=slot.subscription_id,
            state=slot.state,
            error=error,
        )
