"""A payment provider that lives in memory: slow or flaky on purpose, never calls out.

It is the default provider, so a fresh install works without credentials, and the benchmarks
and reliability tests use ``latency_ms`` and ``failure_rate`` to model a real provider.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from nproxyd.core.answers import checked_invoice
from nproxyd.core.config import SimulatedPaymentConfig
from nproxyd.core.errors import ProviderTransientError
from nproxyd.core.ports import InvoiceRequest, ProviderInvoice

Sleep = Callable[[float], Awaitable[None]]


class SimulatedPaymentProvider:
    """Answers every request with a fresh invoice after ``latency_ms``, or fails at random.

    Ids and addresses are 128 random bits, so they stay unique across instances and restarts
    even when ``rng`` is seeded; ``rng`` decides only which calls fail.
    """

    name = "simulated"

    def __init__(
        self,
        config: SimulatedPaymentConfig,
        clock_sleep: Sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._sleep = clock_sleep
        # Not cryptography: only picks which simulated calls fail.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311

    def __repr__(self) -> str:
        return (
            f"SimulatedPaymentProvider(latency_ms={self._config.latency_ms}, "
            f"failure_rate={self._config.failure_rate})"
        )

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice:
        if self._config.latency_ms > 0:
            await self._sleep(self._config.latency_ms / 1000)
        if self._rng.random() < self._config.failure_rate:
            raise ProviderTransientError(f"simulated provider failure for order {request.order_id}")
        token = secrets.token_hex(16)
        invoice = ProviderInvoice(
            provider_invoice_id=f"sim_{token}",
            payment_address=f"sim_addr_{token}",
            pay_amount=request.amount_usd,
            pay_currency=request.currency,
            expires_at=now + timedelta(hours=self._config.invoice_ttl_hours),
        )
        # The same checks as a real provider's answer: a request whose currency could not
        # be stored fails here, for its slot, not in the grouped commit.
        return checked_invoice(invoice, provider=self.name, order_id=request.order_id)

    async def aclose(self) -> None:
        """Nothing to release."""
