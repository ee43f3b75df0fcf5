"""The simulated payment provider: fresh invoices, injected latency, failures on purpose."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from nproxyd.adapters.payment_simulated import SimulatedPaymentProvider
from nproxyd.core.config import SimulatedPaymentConfig
from nproxyd.core.errors import ProviderTransientError
from nproxyd.core.ports import InvoiceRequest, PaymentProvider, ProviderInvoice

NOW = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)


class RecordingSleep:
    """An injected sleep that only remembers how long it was asked to sleep."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_request(order_id: str = "renewal:sub-1:2026-02-12") -> InvoiceRequest:
    return InvoiceRequest(
        order_id=order_id,
        subscription_id="sub-1",
        user_id="user-1",
        plan_code="pro",
        amount_usd=Decimal("29.00"),
        currency="USDT",
        description="nproxy pro renewal",
    )


class FixedRng(random.Random):
    """A random source whose ``random()`` always returns one value: the edges of [0, 1)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


LOWEST = 0.0
HIGHEST = 1.0 - 2**-53  # the largest float random() can return


def make_provider(
    *,
    ttl_hours: float = 24.0,
    latency_ms: int = 0,
    failure_rate: float = 0.0,
    sleep: RecordingSleep | None = None,
    rng: random.Random | None = None,
) -> SimulatedPaymentProvider:
    config = SimulatedPaymentConfig(
        invoice_ttl_hours=ttl_hours, latency_ms=latency_ms, failure_rate=failure_rate
    )
    return SimulatedPaymentProvider(
        config, sleep or RecordingSleep(), rng if rng is not None else random.Random(7)
    )


@pytest.mark.anyio
class TestSimulatedPaymentProvider:
    async def test_invoice_mirrors_request_amount_and_currency(self) -> None:
        """An invoice asks for the requested USD amount in the plan's currency."""
        invoice = await make_provider().create_invoice(make_request(), NOW)
        assert invoice.pay_amount == Decimal("29.00")
        assert invoice.pay_currency == "USDT"
        assert invoice.provider_invoice_id.startswith("sim_")

    async def test_ids_and_addresses_are_unique_per_invoice(self) -> None:
        """Every call yields a new provider invoice id and a new payment address."""
        provider = make_provider()
        invoices = [await provider.create_invoice(make_request(), NOW) for _ in range(50)]
        assert len({invoice.provider_invoice_id for invoice in invoices}) == 50
        assert len({invoice.payment_address for invoice in invoices}) == 50
        assert all(invoice.payment_address for invoice in invoices)

    async def test_ids_stay_unique_when_rng_seeded_alike(self) -> None:
        """Two providers seeded identically (two daemon instances) never share an id."""
        first = await make_provider().create_invoice(make_request(), NOW)
        second = await make_provider().create_invoice(make_request(), NOW)
        assert first.provider_invoice_id != second.provider_invoice_id
        assert first.payment_address != second.payment_address

    async def test_expiry_is_now_plus_ttl(self) -> None:
        """expires_at is the tick's now plus invoice_ttl_hours, not the wall clock."""
        invoice = await make_provider(ttl_hours=1.5).create_invoice(make_request(), NOW)
        assert invoice.expires_at == NOW + timedelta(hours=1.5)

    async def test_latency_goes_through_injected_sleep(self) -> None:
        """latency_ms is spent by awaiting the injected sleep, in seconds."""
        sleep = RecordingSleep()
        await make_provider(latency_ms=250, sleep=sleep).create_invoice(make_request(), NOW)
        assert sleep.calls == [0.25]

    async def test_zero_latency_does_not_sleep(self) -> None:
        """latency_ms = 0 never calls the sleep."""
        sleep = RecordingSleep()
        await make_provider(sleep=sleep).create_invoice(make_request(), NOW)
        assert sleep.calls == []

    async def test_failure_rate_one_always_raises_transient(self) -> None:
        """failure_rate = 1 fails even when the random draw is the highest possible."""
        provider = make_provider(failure_rate=1.0, rng=FixedRng(HIGHEST))
        with pytest.raises(ProviderTransientError):
            await provider.create_invoice(make_request(), NOW)

    async def test_failure_rate_zero_never_raises(self) -> None:
        """failure_rate = 0 succeeds even when the random draw is the lowest possible (0.0)."""
        provider = make_provider(failure_rate=0.0, rng=FixedRng(LOWEST))
        invoice = await provider.create_invoice(make_request(), NOW)
        assert isinstance(invoice, ProviderInvoice)

    @pytest.mark.parametrize(("draw", "fails"), [(0.49, True), (0.5, False), (0.51, False)])
    async def test_a_call_fails_when_its_draw_is_below_the_failure_rate(
        self, draw: float, fails: bool
    ) -> None:
        """failure_rate = 0.5 fails exactly the draws below 0.5."""
        provider = make_provider(failure_rate=0.5, rng=FixedRng(draw))
        try:
            await provider.create_invoice(make_request(), NOW)
        except ProviderTransientError:
            failed = True
        else:
            failed = False
        assert failed is fails

    async def test_failure_rate_half_fails_some_but_not_all(self) -> None:
        """failure_rate between 0 and 1 fails some calls and lets others through."""
        provider = make_provider(failure_rate=0.5)
        outcomes = []
        for _ in range(200):
            try:
                await provider.create_invoice(make_request(), NOW)
                outcomes.append(True)
            except ProviderTransientError:
                outcomes.append(False)
        assert 40 < outcomes.count(False) < 160

    async def test_latency_is_spent_before_failing(self) -> None:
        """A failing call still takes latency_ms, like a slow provider that then errors."""
        sleep = RecordingSleep()
        provider = make_provider(latency_ms=20, failure_rate=1.0, sleep=sleep)
        with pytest.raises(ProviderTransientError):
            await provider.create_invoice(make_request(), NOW)
        assert sleep.calls == [0.02]

    async def test_aclose_is_harmless_and_provider_fits_port(self) -> None:
        """The provider satisfies the PaymentProvider port and can be closed twice."""
        provider: PaymentProvider = make_provider()
        assert provider.name == "simulated"
        await provider.aclose()
        await provider.aclose()
