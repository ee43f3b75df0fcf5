"""The simulated provider's payment story: deterministic, so the flow can be shown locally.

A simulated invoice is ``waiting`` until ``paid_after_seconds`` after it was created, then
``finished`` with the full amount paid — or, for the share ``partial_fraction`` of invoices
(picked by a hash of the payment id, so the same invoice always tells the same story),
``partially_paid`` with half the amount.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from decimal import Decimal

from nproxyd.core.config import SimulatedPaymentConfig
from nproxyd.core.errors import ProviderPermanentError
from nproxyd.core.payments import PaymentRef, ProviderPayment


class SimulatedPaymentStatus:
    name = "simulated"

    def __init__(self, config: SimulatedPaymentConfig) -> None:
        self._paid_after = timedelta(seconds=config.paid_after_seconds)
        self._partial_fraction = config.partial_fraction

    def __repr__(self) -> str:
        return (
            f"SimulatedPaymentStatus(paid_after={self._paid_after}, "
            f"partial_fraction={self._partial_fraction})"
        )

    async def payment_status(self, ref: PaymentRef, now: datetime) -> ProviderPayment:
        paid_at = _paid_at(ref.created_at, self._paid_after)
        if now < paid_at:
            return ProviderPayment(
                payment_id=ref.provider_payment_id,
                status="waiting",
                actually_paid=Decimal(0),
                pay_amount=ref.amount,
                pay_currency=ref.currency,
                updated_at=ref.created_at,
            )
        partial = _share(ref.provider_payment_id) < self._partial_fraction
        return ProviderPayment(
            payment_id=ref.provider_payment_id,
            status="partially_paid" if partial else "finished",
            actually_paid=ref.amount / 2 if partial else ref.amount,
            pay_amount=ref.amount,
            pay_currency=ref.currency,
            outcome_amount=ref.amount / 2 if partial else ref.amount,
            outcome_currency=ref.currency,
            updated_at=paid_at,
        )


def _paid_at(created_at: datetime | None, delay: timedelta) -> datetime:
    """When a simulated invoice is paid; a creation time that cannot be represented (None) or
    moved fails only this invoice's check."""
    try:
        if created_at is not None:
            return created_at + delay
    except OverflowError:
        pass
    raise ProviderPermanentError("the invoice's creation time is out of range")


def _share(payment_id: str) -> float:
    """A stable number in [0, 1) for a payment id."""
    digest = hashlib.sha256(payment_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
