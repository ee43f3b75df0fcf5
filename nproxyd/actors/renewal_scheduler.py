"""Renewal scheduler: one renewal invoice per paid cycle, claimed in the database first.

A tick reads due subscriptions in keyset batches, claims their (subscription, cycle) slots in
one statement, calls the payment provider for the slots it won (bounded concurrency), and
commits each group of answers in one statement: invoice, outbox mail and claim completion
together. A crash anywhere leaves a claim whose lease elapses; the next tick of any instance
takes it over with the same provider ``order_id``.

Bad data never stalls a batch: a candidate that cannot be invoiced (a cycle start Python cannot
represent, a bad plan, an address nproxyd can never deliver to) is skipped before any provider
call; a group whose commit fails on its data is halved until the one slot it fails on is alone,
and that slot is released ``failed`` so the good ones are stored.
"""

from __future__ import annotations

import random
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta

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
    new_message_id,
    order_id,
    render_renewal_body,
)
from nproxyd.core.text import storable

_COMMIT_GROUP = 500
_LOG_AGAIN_AFTER = timedelta(hours=1)  # a warning about one bad row, at most this often
_MEMO_SIZE = 10_000  # rows remembered for that; the oldest are forgotten first
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


class _Run:
    """What one tick's producer, provider workers and committer share."""

    def __init__(self, token: str, leases: LeaseDeadlines, totals: _Totals) -> None:
        self.token = token
        self.leases = leases
        self.now = leases.now
        self.totals = totals


Work = tuple[RenewalCandidate, ClaimedSlot]


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

    async def tick(self, now: datetime) -> RenewalReport:
        """A pipeline: read and claim batches -> provider workers -> grouped commits.

        The next batch is read and claimed while the provider calls of the previous one run,
        so a batch boundary never leaves the provider idle.
        """
        leases = LeaseDeadlines(self.clock, now, self.settings.claim_lease_seconds)
        run = _Run(uuid.uuid4().hex, leases, _Totals())
        size = self.settings.batch_size

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
                    await self._produce(work_send, run)
        if run.totals.created:
            self.log.info("renewal_invoices_created", created_count=run.totals.created)
        return run.totals.report()

    async def _produce(self, work: MemoryObjectSendStream[Work], run: _Run) -> None:
        """Claim each batch of due candidates, hand the won slots to the workers."""
        window_end = run.now + timedelta(hours=self.settings.renewal_lead_time_hours)
        async for batch in self.store.due_candidates(run.now, window_end, self.settings.batch_size):
            run.totals.candidates += len(batch)
            for pair in await self._claim(self._valid(batch, run), run):
                await work.send(pair)

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
            async for candidate, slot in work:
                await results.send(await self._request(candidate, slot, run))

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
            invoice_id=str(uuid.uuid4()),
            user_id=candidate.user_id,
            provider_invoice_id=answer.provider_invoice_id,
            currency=candidate.billing_currency,
            amount=amount,
            payment_address=answer.payment_address,
            expires_at=answer.expires_at,
            to_address=candidate.email,
            body=body,
            message_id=new_message_id(self.settings.from_address),
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
        async with receiver:
            async for first in receiver:
                group = [first]
                while len(group) < _COMMIT_GROUP:
                    try:
                        group.append(receiver.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._commit(group, run.now, run.totals)

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
        by_subscription = {invoice.subscription_id: invoice for invoice in invoices}
        created = 0
        for slot in completed:
            if slot.superseded:
                totals.superseded += 1
                continue
            created += 1
            invoice = by_subscription[slot.subscription_id]
            self.log.debug(
                "renewal_invoice_created",
                invoice_id=invoice.invoice_id,
                subscription_id=invoice.subscription_id,
                order_id=order_id(invoice.subscription_id, invoice.cycle_start),
            )
        totals.created += created
        if created:
            self.outbox.offer(OutboxReady(count=created))

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
