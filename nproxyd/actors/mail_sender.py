"""Mail sender: delivers the durable outbox, at least once, never losing a row.

Rows are leased in batches (``FOR UPDATE SKIP LOCKED``), so instances never send the same row
at the same time, and a row whose sender died is taken again once its lease elapses. Every row
leaves ``pending`` only as ``sent`` or ``dead`` with its reason.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

import anyio
import msgspec
import structlog

from nproxyd.actors.leases import LeaseClock, kept_alive
from nproxyd.core.clock import Clock
from nproxyd.core.config import Config
from nproxyd.core.errors import MailPermanentError
from nproxyd.core.mail import compose_message
from nproxyd.core.messages import MailReport
from nproxyd.core.ports import MailTransport
from nproxyd.core.rules import backoff_seconds, is_plausible_address
from nproxyd.store.rows import MailOutcome, OutboxMail


class OutboxPort(Protocol):
    async def claim(
        self, now: datetime, lease_until: datetime, holder: str, limit: int
    ) -> list[OutboxMail]: ...

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int: ...

    async def extend(self, ids: Sequence[str], holder: str, lease_until: datetime) -> int: ...


class MailSettings(msgspec.Struct, frozen=True, kw_only=True):
    interval_seconds: float
    batch_size: int
    lease_seconds: float
    max_attempts: int
    concurrency: int
    from_address: str
    instance_id: str
    retry_base_seconds: float = 30.0
    retry_cap_seconds: float = 3600.0

    @classmethod
    def from_config(cls, config: Config, instance_id: str, concurrency: int) -> MailSettings:
        section = config.actors.mail_sender
        return cls(
            interval_seconds=section.interval_seconds,
            batch_size=section.batch_size,
            lease_seconds=section.lease_seconds,
            max_attempts=section.max_attempts,
            concurrency=concurrency,
            from_address=config.email.from_address,
            instance_id=instance_id,
            retry_base_seconds=section.retry_base_seconds,
            retry_cap_seconds=section.retry_max_seconds,
        )


class MailSender:
    name = "mail-sender"

    def __init__(
        self,
        store: OutboxPort,
        transport: MailTransport,
        settings: MailSettings,
        *,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.interval_seconds = settings.interval_seconds
        self.log = structlog.get_logger().bind(actor=self.name)

    async def tick(self, now: datetime) -> MailReport:
        """Deliver everything due at ``now`` once."""
        leases = LeaseClock(self.clock, now, self.settings.lease_seconds)
        holder = self.settings.instance_id
        counts: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        while True:
            batch = await self.store.claim(now, leases.deadline(), holder, self.settings.batch_size)
            if not batch:
                break
            ids = [mail.id for mail in batch]

            async def extend(until: datetime, ids: list[str] = ids) -> int:
                return await self.store.extend(ids, holder, until)

            async with kept_alive(leases, extend, what="mail"):
                outcomes = await self._deliver_all(batch, now, failures)
            await self.store.record(outcomes, now, holder)
            counts.update(outcome.status for outcome in outcomes)
            counts["claimed"] += len(batch)
            if len(batch) < self.settings.batch_size:
                break
        return self._report(counts, failures)

    def _report(self, counts: Counter[str], failures: Counter[str]) -> MailReport:
        if counts["sent"]:
            self.log.info("mail_sent", sent_count=counts["sent"])
        return MailReport(
            claimed=counts["claimed"],
            sent_count=counts["sent"],
            retried_count=counts["pending"],
            dead_count=counts["dead"],
            failures=dict(failures),
        )

    async def _deliver_all(
        self, batch: list[OutboxMail], now: datetime, failures: Counter[str]
    ) -> list[MailOutcome]:
        """Deliver a batch with ``concurrency`` workers sharing one queue of rows."""
        outcomes: list[MailOutcome] = []
        queue = iter(batch)

        async def worker() -> None:
            for mail in queue:  # each worker takes the next row; no row is taken twice
                outcomes.append(await self._deliver(mail, now, failures))

        async with anyio.create_task_group() as group:
            for number in range(min(self.settings.concurrency, len(batch))):
                group.start_soon(worker, name=f"mail-worker-{number}")
        return outcomes

    async def _deliver(
        self, mail: OutboxMail, now: datetime, failures: Counter[str]
    ) -> MailOutcome:
        if not is_plausible_address(mail.to_address):
            failures["permanent"] += 1
            return self._dead(mail, now, "invalid recipient address")
        try:
            message = compose_message(
                from_address=self.settings.from_address,
                to_address=mail.to_address,
                subject=mail.subject,
                body=mail.body,
                message_id=mail.message_id,
                date=now,
            )
            await self.transport.send(message, mail.to_address)
        except (MailPermanentError, ValueError) as exc:
            failures["permanent"] += 1
            return self._dead(mail, now, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            failures["transient"] += 1
            return self._retry(mail, now, f"{type(exc).__name__}: {exc}")
        return MailOutcome(id=mail.id, status="sent", error=None, next_attempt_at=now)

    def _dead(self, mail: OutboxMail, now: datetime, reason: str) -> MailOutcome:
        self.log.warning("mail_dead", mail_id=mail.id, attempts=mail.attempts + 1, reason=reason)
        return MailOutcome(id=mail.id, status="dead", error=reason[:1000], next_attempt_at=now)

    def _retry(self, mail: OutboxMail, now: datetime, reason: str) -> MailOutcome:
        attempts = mail.attempts + 1
        if attempts >= self.settings.max_attempts:
            return self._dead(mail, now, f"gave up after {attempts} attempts: {reason}")
        delay = backoff_seconds(
            attempts,
            base_seconds=self.settings.retry_base_seconds,
            cap_seconds=self.settings.retry_cap_seconds,
            rng=self.rng,
        )
        self.log.info(
            "mail_retry_scheduled",
            mail_id=mail.id,
            attempts=attempts,
            retry_in_seconds=round(delay, 1),
            reason=reason,
        )
        return MailOutcome(
            id=mail.id,
            status="pending",
            error=reason[:1000],
            next_attempt_at=now + timedelta(seconds=delay),
        )
