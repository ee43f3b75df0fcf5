"""Invoice expirer: pending invoices past their expiry become ``expired``."""

from __future__ import annotations

from datetime import datetime

import msgspec
import structlog

from nproxyd.core.clock import Clock
from nproxyd.core.messages import ExpirerReport
from nproxyd.core.ports import ExpiryStore


class ExpirerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``[actors.invoice_expirer]``."""

    interval_seconds: float
    batch_size: int


class ExpirerPorts(msgspec.Struct, frozen=True, kw_only=True):
    store: ExpiryStore


class InvoiceExpirer:
    """Expires due invoices in bounded batches, each its own short transaction.

    How the due rows are walked (physical order or the index) is the store's business.
    """

    name = "invoice-expirer"

    def __init__(self, settings: ExpirerSettings, ports: ExpirerPorts, clock: Clock) -> None:
        self.settings = settings
        self.store = ports.store
        self.clock = clock
        self.interval_seconds = settings.interval_seconds
        self.log = structlog.get_logger().bind(actor=self.name)

    async def tick(self, now: datetime) -> ExpirerReport:
        expired = batches = 0
        async for count in self.store.expire_due(now, self.settings.batch_size):
            batches += 1
            expired += count
        if expired:
            self.log.info("pending_invoices_expired", expired_count=expired)
        return ExpirerReport(expired_count=expired, batches=batches)
