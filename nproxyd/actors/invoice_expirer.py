"""Invoice expirer: pending invoices past their expiry become ``expired``."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import structlog

from nproxyd.core.messages import ExpirerReport
from nproxyd.store.rows import KEYSET_START, ExpiryBatch


class ExpiryStore(Protocol):
    async def expire_batch(
        self, now: datetime, after: tuple[datetime, str], limit: int
    ) -> ExpiryBatch: ...


class InvoiceExpirer:
    """Expires due invoices in keyset batches, each its own short transaction."""

    name = "invoice-expirer"

    def __init__(self, store: ExpiryStore, *, interval_seconds: float, batch_size: int) -> None:
        self.store = store
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        self.log = structlog.get_logger().bind(actor=self.name)

    async def tick(self, now: datetime) -> ExpirerReport:
        cursor = KEYSET_START
        expired = batches = 0
        while True:
            batch = await self.store.expire_batch(now, cursor, self.batch_size)
            batches += 1
            expired += batch.expired
            if batch.scanned < self.batch_size or batch.last_id is None:
                break
            assert batch.last_expires_at is not None
            cursor = (batch.last_expires_at, batch.last_id)
        if expired:
            self.log.info("pending_invoices_expired", expired_count=expired)
        return ExpirerReport(expired_count=expired, batches=batches)
