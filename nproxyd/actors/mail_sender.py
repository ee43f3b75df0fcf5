"""Mail sender: delivers the durable outbox, at least once, never losing a row.

Rows are leased in batches (``FOR UPDATE SKIP LOCKED``), so instances never send the same row
at the same time, and a row whose sender died is taken again once its lease elapses. Every row
leaves ``pending`` only as ``sent`` or ``dead`` with its reason.

No poison spreads (docs/design.md §3 invariant 8): every reason is made storable before it is
recorded; sent outcomes are recorded in their own statement first, so a delivered mail is
never re-sent because of a neighbour; a batch the database still refuses is bisected down to
the row at fault, which is quarantined (``dead``, "unstorable …"). An unavailable server
(connection refused, 421, TLS or login failure) defers the rest of the batch without using up
any mail's attempts: ``max_attempts`` counts the server's answers about the mail itself.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from datetime import datetime, timedelta
from email.message import Message

import anyio
import msgspec
import structlog

from nproxyd.actors.leases import LeaseDeadlines, kept_alive
from nproxyd.core.clock import Clock
from nproxyd.core.errors import (
    MailPermanentError,
    MailTransientError,
    MailUnavailableError,
    StoreDataError,
)
from nproxyd.core.mail import compose_message
from nproxyd.core.messages import MailReport
from nproxyd.core.ports import MailOutboxStore, MailTransport
from nproxyd.core.records import MailOutcome, OutboxMail
from nproxyd.core.rules import address_problem, backoff_seconds
from nproxyd.core.text import storable


class MailSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``[actors.mail_sender]``, the sender address, the instance and the delivery workers."""

    interval_seconds: float
    batch_size: int
    lease_seconds: float
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    from_address: str
    instance_id: str
    concurrency: int  # workers per batch: the transport's connections


class MailPorts(msgspec.Struct, frozen=True, kw_only=True):
    store: MailOutboxStore
    transport: MailTransport


class MailSender:
    name = "mail-sender"

    def __init__(
        self,
        settings: MailSettings,
        ports: MailPorts,
        clock: Clock,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = ports.store
        self.transport = ports.transport
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.interval_seconds = settings.interval_seconds
        self.log = structlog.get_logger().bind(actor=self.name)
        # Consecutive batches that found the server unavailable: the deferral's backoff.
        self._outage_streak = 0
        # Mail delivered whose outcome the database refused even as dead: when its lease
        # elapses and it is claimed again, it is recorded again, never delivered again.
        self._delivered_unrecorded: set[str] = set()

    async def tick(self, now: datetime) -> MailReport:
        """Deliver everything due at ``now`` once.

        While one batch is on the wire, the batch before it is recorded and the next one leased
        (two statements at once, in the background), so the database's round trips overlap
        delivery. A mail is recorded sent only after the server accepted it; whatever stops the
        tick leaves every row not yet recorded leased, delivered again once its lease elapsed
        (at least once, never lost).
        """
        leases = LeaseDeadlines(self.clock, now, self.settings.lease_seconds)
        tally = _Tally()
        batches = self.store.due_mail(
            now,
            self.settings.batch_size,
            holder=self.settings.instance_id,
            lease_until=leases.deadline,
        )
        async with aclosing(batches):
            ahead = _Ahead(await anext(batches, None))
            outcomes: list[MailOutcome] = []
            outage: _Outage | None = None
            while ahead.batch is not None:
                batch, previous = ahead.batch, outcomes
                ahead = _Ahead(None, held=[mail.id for mail in batch])
                tally.counts["claimed"] += len(batch)
                outage = _Outage(leases.now, after=outage)
                async with anyio.create_task_group() as group:
                    group.start_soon(
                        self._record_and_claim, previous, batches, ahead, outage, tally.counts
                    )
                    outcomes = await self._send_batch(batch, ahead.held, leases, outage, tally)
                if tally.bugs or ahead.error is not None:
                    break
            # The last batch; or, before a bug or a database error is raised, what was delivered.
            await self._record(outcomes, leases.now, tally.counts)
        _raise_first(tally.bugs, ahead.error)
        return self._report(tally.counts, tally.failures)

    async def _record_and_claim(
        self,
        outcomes: list[MailOutcome],
        batches: AsyncGenerator[list[OutboxMail], None],
        ahead: _Ahead,
        outage: _Outage,
        counts: Counter[str],
    ) -> None:
        """Record the previous batch's outcomes and, at the same time, lease the next batch into
        ``ahead`` (its ids join ``ahead.held``, whose leases are kept alive), unless the server
        is unavailable: it would refuse the next batch too.

        The two statements touch different rows: the previous batch's rows stay leased to this
        instance until their outcome is committed, and are no longer due once it is.
        """

        async def record() -> None:
            try:
                await self._record(outcomes, outage.now, counts)
            except Exception as exc:  # raised by the tick once the batch on the wire is recorded
                ahead.error = exc

        async with anyio.create_task_group() as group:
            if outcomes:
                group.start_soon(record, name="mail-record")
            if outage.reason is None:
                try:
                    ahead.batch = await anext(batches, None)
                except Exception as exc:
                    ahead.error = exc
                    return
        if ahead.batch is not None:
            ahead.held.extend(mail.id for mail in ahead.batch)

    async def _send_batch(
        self,
        batch: list[OutboxMail],
        held: list[str],
        leases: LeaseDeadlines,
        outage: _Outage,
        tally: _Tally,
    ) -> list[MailOutcome]:
        """Deliver one leased batch, keeping the leases of ``held`` alive; returns its outcomes."""
        holder = self.settings.instance_id

        async def extend(until: datetime) -> int:
            return await self.store.extend(held, holder, until)

        async with kept_alive(leases, extend, what="mail"):
            return await self._deliver_all(batch, leases.now, tally.failures, outage, tally.bugs)

    def _report(self, counts: Counter[str], failures: Counter[str]) -> MailReport:
        if counts["sent"]:
            self.log.info("mail_sent", sent_count=counts["sent"])
        return MailReport(
            claimed=counts["claimed"],
            sent_count=counts["sent"],
            retried_count=counts["pending"],
            dead_count=counts["dead"],
            failures=dict(failures),
            deferred_count=counts["deferred"],
            quarantined_count=counts["quarantined"],
            unrecorded_count=counts["unrecorded"],
        )

    # -- delivery --------------------------------------------------------------------------

    async def _deliver_all(
        self,
        batch: list[OutboxMail],
        now: datetime,
        failures: Counter[str],
        outage: _Outage,
        bugs: list[Exception],
    ) -> list[MailOutcome]:
        """Deliver a batch with ``concurrency`` workers sharing one queue of rows.

        A programming error (anything but the mail error family) stops every worker taking
        rows and lands in ``bugs``; the outcomes so far are returned for recording.
        """
        outcomes: list[MailOutcome] = []
        queue = iter(batch)

        async def worker() -> None:
            for mail in queue:  # each worker takes the next row; no row is taken twice
                if bugs:
                    return
                if outage.reason is not None:
                    outcomes.append(self._defer(mail, outage))
                    continue
                try:
                    outcomes.append(await self._deliver(mail, now, failures, outage))
                except Exception as exc:
                    bugs.append(exc)

        async with anyio.create_task_group() as group:
            for number in range(min(self.settings.concurrency, len(batch))):
                group.start_soon(worker, name=f"mail-worker-{number}")
        if not outage.inherited:
            self._note_outage(outage)
        return outcomes

    async def _deliver(
        self, mail: OutboxMail, now: datetime, failures: Counter[str], outage: _Outage
    ) -> MailOutcome:
        if mail.id in self._delivered_unrecorded:
            return MailOutcome(id=mail.id, status="sent", error=None, next_attempt_at=now)
        message = self._compose(mail, now)
        if isinstance(message, str):
            failures["permanent"] += 1
            return self._quarantined(mail, now, message)
        try:
            await self.transport.send(message, mail.to_address)
        except MailUnavailableError as exc:
            failures["unavailable"] += 1
            outage.begin(storable(exc.message), self._outage_delay())
            return self._defer(mail, outage)
        except MailPermanentError as exc:
            failures["permanent"] += 1
            return self._dead(mail, now, _reason(exc))
        except MailTransientError as exc:
            failures["transient"] += 1
            return self._retry(mail, now, _reason(exc))
        self.log.debug("mail_delivered", mail_id=mail.id, message_id=mail.message_id)
        return MailOutcome(id=mail.id, status="sent", error=None, next_attempt_at=now)

    def _compose(self, mail: OutboxMail, now: datetime) -> Message | str:
        """The message of ``mail``, or why it can never be sent (no server is asked)."""
        problem = address_problem(mail.to_address)
        if problem is not None:
            return f"invalid recipient address: {problem}"
        try:
            return compose_message(
                from_address=self.settings.from_address,
                to_address=mail.to_address,
                subject=mail.subject,
                body=mail.body,
                message_id=mail.message_id,
                date=now,
            )
        except (ValueError, UnicodeError) as exc:
            return f"message cannot be composed: {_reason(exc)}"

    def _outage_delay(self) -> float:
        return backoff_seconds(
            self._outage_streak + 1,
            base_seconds=self.settings.retry_base_seconds,
            cap_seconds=self.settings.retry_max_seconds,
            rng=self.rng,
        )

    def _note_outage(self, outage: _Outage) -> None:
        if outage.reason is None:
            self._outage_streak = 0
            return
        self._outage_streak += 1
        self.log.warning(
            "mail_server_unavailable",
            reason=outage.reason,
            consecutive_batches=self._outage_streak,
            retry_in_seconds=round(outage.delay_seconds, 1),
        )

    # -- outcomes --------------------------------------------------------------------------

    def _dead(self, mail: OutboxMail, now: datetime, reason: str) -> MailOutcome:
        self.log.warning("mail_dead", mail_id=mail.id, attempts=mail.attempts + 1, reason=reason)
        return MailOutcome(id=mail.id, status="dead", error=storable(reason), next_attempt_at=now)

    def _quarantined(self, mail: OutboxMail, now: datetime, reason: str) -> MailOutcome:
        """Dead without asking any server: the row itself can never be delivered."""
        reason = storable(reason)
        self.log.warning("mail_row_quarantined", mail_id=mail.id, reason=reason)
        return MailOutcome(id=mail.id, status="dead", error=reason, next_attempt_at=now)

    def _defer(self, mail: OutboxMail, outage: _Outage) -> MailOutcome:
        """Back to pending after the outage's delay, without using up an attempt."""
        reason = f"SMTP server unavailable: {outage.reason}"
        self.log.debug("mail_deferred", mail_id=mail.id, reason=reason)
        return MailOutcome(
            id=mail.id,
            status="pending",
            error=storable(reason),
            next_attempt_at=outage.until,
            counts_attempt=False,
        )

    def _retry(self, mail: OutboxMail, now: datetime, reason: str) -> MailOutcome:
        attempts = mail.attempts + 1
        if attempts >= self.settings.max_attempts:
            return self._dead(mail, now, f"gave up after {attempts} attempts: {reason}")
        delay = backoff_seconds(
            attempts,
            base_seconds=self.settings.retry_base_seconds,
            cap_seconds=self.settings.retry_max_seconds,
            rng=self.rng,
        )
        self.log.warning(
            "mail_retry_scheduled",
            mail_id=mail.id,
            attempts=attempts,
            retry_in_seconds=round(delay, 1),
            reason=reason,
        )
        return MailOutcome(
            id=mail.id,
            status="pending",
            error=storable(reason),
            next_attempt_at=now + timedelta(seconds=delay),
        )

    # -- recording -------------------------------------------------------------------------

    async def _record(
        self, outcomes: Sequence[MailOutcome], now: datetime, counts: Counter[str]
    ) -> None:
        """Record sent outcomes first, in their own statement, then the others."""
        sent = [outcome for outcome in outcomes if outcome.status == "sent"]
        others = [outcome for outcome in outcomes if outcome.status != "sent"]
        for group in (sent, others):
            if group:
                await self._record_isolating(group, now, counts)

    async def _record_isolating(
        self, outcomes: Sequence[MailOutcome], now: datetime, counts: Counter[str]
    ) -> None:
        """Record ``outcomes``; when the database refuses their data, bisect to the row at fault."""
        try:
            await self.store.record(outcomes, now, self.settings.instance_id)
        except StoreDataError as exc:
            if len(outcomes) == 1:
                await self._quarantine_outcome(outcomes[0], now, exc, counts)
                return
            middle = len(outcomes) // 2
            await self._record_isolating(outcomes[:middle], now, counts)
            await self._record_isolating(outcomes[middle:], now, counts)
            return
        counts.update(_counted_as(outcome) for outcome in outcomes)
        self._delivered_unrecorded.difference_update(outcome.id for outcome in outcomes)

    async def _quarantine_outcome(
        self, outcome: MailOutcome, now: datetime, exc: StoreDataError, counts: Counter[str]
    ) -> None:
        """Make a row whose outcome the database refused ``dead``; count it if even that fails."""
        reason = storable(f"unstorable {outcome.status} outcome: {exc.message}")
        dead = MailOutcome(
            id=outcome.id,
            status="dead",
            error=reason,
            next_attempt_at=now,
            counts_attempt=outcome.counts_attempt,
        )
        try:
            await self.store.record([dead], now, self.settings.instance_id)
        except StoreDataError as again:
            counts["unrecorded"] += 1
            if outcome.status == "sent":
                self._delivered_unrecorded.add(outcome.id)
            self.log.error(  # noqa: TRY400 - the driver's traceback quotes the refused values
                "mail_outcome_unrecordable",
                mail_id=outcome.id,
                status=outcome.status,
                reason=storable(again.message),
            )
            return
        counts.update(("dead", "quarantined"))
        self._delivered_unrecorded.discard(outcome.id)
        self.log.warning("mail_row_quarantined", mail_id=outcome.id, reason=reason)


class _Outage:
    """Whether one batch found the server unavailable, why, and until when it defers its rows.

    A batch leased while the one before it found the server unavailable inherits that outage:
    its rows are deferred as well, without asking the server again.
    """

    def __init__(self, now: datetime, *, after: _Outage | None = None) -> None:
        self.now = now
        self.reason: str | None = None
        self.delay_seconds = 0.0
        self.until = now
        self.inherited = after is not None and after.reason is not None
        if after is not None and after.reason is not None:
            self.reason, self.delay_seconds, self.until = (
                after.reason,
                after.delay_seconds,
                after.until,
            )

    def begin(self, reason: str, delay_seconds: float) -> None:
        """The first unavailability of the batch decides the deferral of every remaining row."""
        if self.reason is None:
            self.reason, self.delay_seconds = reason, delay_seconds
            self.until = self.now + timedelta(seconds=delay_seconds)


class _Ahead:
    """The next batch, leased while the current one is delivered, or why it could not be;
    ``held``: the ids whose leases are kept alive meanwhile (the current batch's and its)."""

    def __init__(self, batch: list[OutboxMail] | None, *, held: list[str] | None = None) -> None:
        self.batch = batch
        self.held = held or []
        self.error: Exception | None = None


class _Tally:
    """What one tick counted, the failures by kind, and the bugs that stopped it."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.bugs: list[Exception] = []


def _raise_first(bugs: list[Exception], error: Exception | None) -> None:
    """A bug in delivery first (the tick fails), else the database's error while recording or
    leasing in the background."""
    if bugs:
        raise bugs[0] if len(bugs) == 1 else ExceptionGroup("mail delivery bugs", bugs)
    if error is not None:
        raise error


def _reason(exc: BaseException) -> str:
    """An exception as a storable reason: its class and its (cleaned) text."""
    return storable(f"{type(exc).__name__}: {exc}")


def _counted_as(outcome: MailOutcome) -> str:
    if outcome.status == "pending" and not outcome.counts_attempt:
        return "deferred"
    return outcome.status
