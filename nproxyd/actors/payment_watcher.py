"""Payment watcher: the provider's view of every open invoice, for the operator who activates.

A tick starts following new invoices of the configured provider, then asks the provider about
every invoice whose check is due (bounded concurrency, batches from the store) and records the
answers. Each invoice has its own schedule: checked soon after creation, then less often while
nothing changes, never again once the provider's status is final or the grace has passed.
Instant payment notifications (IPN) go through the same record statement. Nothing here sets an
invoice ``paid`` or touches a subscription (docs/design.md, invariant 9).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import anyio
import msgspec
import structlog

from nproxyd.core.channels import Outbox
from nproxyd.core.clock import Clock
from nproxyd.core.errors import (
    IpnRejected,
    ProviderCredentialsRefused,
    ProviderError,
    ProviderInvalidAnswer,
    ProviderPermanentError,
    ProviderRateLimited,
)
from nproxyd.core.messages import OutboxReady, PaymentWatcherReport
from nproxyd.core.payments import (
    AWAITING_STATUSES,
    KNOWN_STATUSES,
    CheckOutcome,
    CheckResult,
    IpnOutcome,
    OperatorMail,
    PaymentCheck,
    ProviderPayment,
    RecordContext,
    Schedule,
    StatusChange,
    answer_problem,
    operator_mail,
)
from nproxyd.core.ports import IpnVerifier, PaymentStatusSource, PaymentWatchStore
from nproxyd.core.rules import new_message_id
from nproxyd.core.text import storable


class PaymentWatcherSettings(msgspec.Struct, frozen=True, kw_only=True):
    interval_seconds: float
    min_check_seconds: float
    max_check_seconds: float
    grace_hours: float
    payment_provider: str
    provider_concurrency: int
    operator_email: str
    from_address: str
    batch_size: int
    lease_seconds: float


class PaymentWatcherPorts(msgspec.Struct, frozen=True, kw_only=True):
    store: PaymentWatchStore
    source: PaymentStatusSource
    verifier: IpnVerifier | None = None
    outbox: Outbox | None = None


class _Tally:
    def __init__(self) -> None:
        self.checks: Counter[str] = Counter()
        self.changes: Counter[str] = Counter()
        self.retired = self.mails = 0

    def add(self, results: list[CheckResult], changes: list[StatusChange]) -> None:
        self.checks.update(result.outcome for result in results)
        self.changes.update(change.to_status for change in changes)
        self.mails += sum(change.mailed for change in changes)


class PaymentWatcher:
    """Polls the provider for due invoices and records what it reports."""

    name = "payment-watcher"

    def __init__(
        self, settings: PaymentWatcherSettings, ports: PaymentWatcherPorts, clock: Clock
    ) -> None:
        self.settings = settings
        self.ports = ports
        self.clock = clock
        self.interval_seconds = settings.interval_seconds
        self.schedule = Schedule(
            min_check_seconds=settings.min_check_seconds,
            max_check_seconds=settings.max_check_seconds,
        )
        self.log = structlog.get_logger().bind(actor=self.name)

    async def tick(self, now: datetime) -> PaymentWatcherReport:
        store, settings = self.ports.store, self.settings
        discovered = await store.discover(settings.payment_provider, now, settings.grace_hours)
        settled = await store.settle_awaiting(now)
        tally = await self._check_due(now)
        summary = await store.awaiting_summary(now)
        if tally.checks:
            self.log.info(
                "payment_statuses_checked",
                checked_count=sum(tally.checks.values()),
                changed_count=sum(tally.changes.values()),
                awaiting_count=summary.count,
            )
        return PaymentWatcherReport(
            discovered=discovered,
            checked=sum(tally.checks.values()),
            retired=tally.retired,
            settled=settled,
            checks=dict(tally.checks),
            status_changes=dict(tally.changes),
            operator_mails=tally.mails,
            awaiting_count=summary.count,
            awaiting_oldest_seconds=summary.oldest_seconds,
        )

    async def _check_due(self, now: datetime) -> _Tally:
        """Check every due invoice, batch by batch as the store leases them."""
        settings, tally = self.settings, _Tally()
        started = self.clock.monotonic()

        def lease_until() -> datetime:
            # Stamped from the tick's now plus the time already spent: a batch claimed late in
            # a long tick still gets a whole lease.
            spent = self.clock.monotonic() - started
            return now + timedelta(seconds=spent + settings.lease_seconds)

        batches = self.ports.store.due_checks(
            now, settings.batch_size, grace_hours=settings.grace_hours, lease_until=lease_until
        )
        async for batch in batches:
            tally.retired += batch.retired
            results = await self._check_all(batch.checks, now)
            changes = await self.ports.store.record(results, self._context(now, "poll"))
            tally.add(results, changes)
            self._changed(changes)
        return tally

    async def receive_ipn(self, body: bytes, signature: str | None) -> IpnOutcome:
        """Verify and record one instant payment notification, as a poll answer would be."""
        if self.ports.verifier is None:
            return IpnOutcome(outcome="rejected")
        try:
            payment = self.ports.verifier.verify(body, signature)
        except IpnRejected as exc:
            self.log.warning("ipn_rejected", reason=exc.message)
            return IpnOutcome(outcome="rejected")
        except ProviderInvalidAnswer as exc:
            self.log.warning("ipn_invalid", reason=exc.message)
            return IpnOutcome(outcome="invalid")
        now = self.clock.now()
        problem = answer_problem(payment, now)
        if problem is not None:
            self.log.warning("ipn_invalid", reason=problem, provider_payment_id=payment.payment_id)
            return IpnOutcome(outcome="invalid")
        check = await self.ports.store.track_payment(
            self.settings.payment_provider, payment.payment_id, now
        )
        if check is None:
            self.log.info("ipn_unknown_payment", provider_payment_id=payment.payment_id)
            return IpnOutcome(outcome="unknown_payment")
        self._note_unknown(check, payment)
        result = CheckResult(
            invoice_id=check.invoice_id,
            outcome="ok",
            payment=payment,
            mail=self._mail(check, payment),
        )
        changes = await self.ports.store.record([result], self._context(now, "ipn"))
        self._changed(changes)
        return IpnOutcome(outcome="ok", change=changes[0] if changes else None)

    async def _check_all(self, checks: list[PaymentCheck], now: datetime) -> list[CheckResult]:
        results: list[CheckResult] = []
        limiter = anyio.CapacityLimiter(self.settings.provider_concurrency)
        held_back: list[float] = []  # Retry-After of a 429: no more calls this tick

        async def check_one(check: PaymentCheck) -> None:
            async with limiter:
                if held_back:
                    results.append(self._rate_limited(check, held_back[0], now, None))
                    return
                results.append(await self._check(check, now, held_back))

        async with anyio.create_task_group() as group:
            for check in checks:
                group.start_soon(check_one, check, name=f"payment-check-{check.invoice_id}")
        return results

    async def _check(
        self, check: PaymentCheck, now: datetime, held_back: list[float]
    ) -> CheckResult:
        try:
            payment = await self.ports.source.payment_status(check.ref(), now)
        except ProviderRateLimited as exc:
            held_back.append(exc.retry_after_seconds)
            return self._rate_limited(check, exc.retry_after_seconds, now, exc.message)
        except ProviderError as exc:
            return self._failed(check, exc, now)
        problem = answer_problem(payment, now)
        if problem is not None:
            return self._failed(check, ProviderInvalidAnswer(problem), now)
        self._note_unknown(check, payment)
        next_check_at, quiet = self.schedule.after_answer(check, payment.status, now)
        return CheckResult(
            invoice_id=check.invoice_id,
            outcome="ok",
            payment=payment,
            next_check_at=next_check_at,
            quiet_checks=quiet,
            mail=self._mail(check, payment),
        )

    def _failed(self, check: PaymentCheck, exc: ProviderError, now: datetime) -> CheckResult:
        error = storable(exc.message, 500)
        if isinstance(exc, ProviderPermanentError):
            self.log.warning("payment_check_refused", invoice_id=check.invoice_id, error=error)
            refused_key = isinstance(exc, ProviderCredentialsRefused)
            return CheckResult(
                invoice_id=check.invoice_id,
                outcome="unauthorized" if refused_key else "permanent",
                error=error,
                next_check_at=self.schedule.after_refusal(now),
                quiet_checks=check.quiet_checks,
                failures=check.failures + 1,
            )
        outcome: CheckOutcome = "invalid" if isinstance(exc, ProviderInvalidAnswer) else "transient"
        self.log.warning(
            "payment_check_failed", invoice_id=check.invoice_id, outcome=outcome, error=error
        )
        next_check_at, failures = self.schedule.after_failure(check, now)
        return CheckResult(
            invoice_id=check.invoice_id,
            outcome=outcome,
            error=error,
            next_check_at=next_check_at,
            quiet_checks=check.quiet_checks,
            failures=failures,
        )

    def _rate_limited(
        self, check: PaymentCheck, retry_after: float, now: datetime, error: str | None
    ) -> CheckResult:
        return CheckResult(
            invoice_id=check.invoice_id,
            outcome="rate_limited",
            error=storable(error or "held back after HTTP 429 this tick", 500),
            next_check_at=self.schedule.after_rate_limit(retry_after, now),
            quiet_checks=check.quiet_checks,
            failures=check.failures,
        )

    def _mail(self, check: PaymentCheck, payment: ProviderPayment) -> OperatorMail | None:
        """The operator mail for a first awaiting status (the database refuses a second)."""
        if not self.settings.operator_email or payment.status not in AWAITING_STATUSES:
            return None
        if payment.status == check.provider_status:
            return None
        return operator_mail(check, payment, new_message_id(self.settings.from_address))

    def _note_unknown(self, check: PaymentCheck, payment: ProviderPayment) -> None:
        if payment.status not in KNOWN_STATUSES:
            self.log.warning(
                "payment_status_unknown", invoice_id=check.invoice_id, status=payment.status
            )

    def _context(self, now: datetime, source: str) -> RecordContext:
        return RecordContext(
            now=now,
            source="ipn" if source == "ipn" else "poll",
            operator_email=self.settings.operator_email or None,
        )

    def _changed(self, changes: list[StatusChange]) -> None:
        for change in changes:
            self.log.info(
                "payment_status_changed",
                invoice_id=change.invoice_id,
                from_status=change.from_status,
                to_status=change.to_status,
                source=change.source,
                operator_mailed=change.mailed,
            )
        if any(change.mailed for change in changes) and self.ports.outbox is not None:
            self.ports.outbox.offer(OutboxReady(count=sum(c.mailed for c in changes)))
