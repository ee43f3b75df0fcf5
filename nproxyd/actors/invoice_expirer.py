"""Invoice expirer: pending invoices past their expiry become ``expired``."""

from __future__ import annotations

from datetime import datetime

import structlog

from nproxyd.core.messages import ExpirerReport
from nproxyd.core.ports import ExpiryStore


class InvoiceExpirer:
    """Expires due invoices in bounded batches, each its own short transaction.

    How the due rows are walked (physical order or the index) is the store's business.
    """

    name = "invoice-expirer"

    def __init__(self, store: ExpiryStore, *, interval_seconds: float, batch_size: int) -> None:
        self.store = store
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        self.log = structlog.get_logger().bind(actor=self.name)

    async def tick(self, now: datetime) -> ExpirerReport:
        expired = batches = 0
        async for count in self.store.expire_due(now, self.batch_size):
            batches += 1
            expired += count
        if expired:
            self.log.info("pending_invoices_expired", expired_count=expired)
        return ExpirerReport(expired_count=expired, batches=batches)
