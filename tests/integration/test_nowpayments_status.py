"""NOWPayments payment status and IPN verification against the local stand-in, over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import anyio
import pytest

from nproxyd.adapters.nowpayments_status import (
    NowPaymentsIpnVerifier,
    NowPaymentsStatus,
    retry_after_seconds,
)
from nproxyd.core.budget import RequestBudget
from nproxyd.core.config import NowPaymentsConfig
from nproxyd.core.errors import (
    IpnRejected,
    ProviderInvalidAnswer,
    ProviderPermanentError,
    ProviderRateLimited,
    ProviderTransientError,
)
from nproxyd.core.payments import PaymentRef
from tests.fakes.clock import FakeClock
from tests.fakes.nowpayments import (
    RETRY_AFTER_SECONDS,
    FakeNowPayments,
    Mode,
    ipn_body,
    ipn_signature,
    status_answer,
)

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
SECRET = "s3cret-ipn"


def ref(payment_id: str = "5001") -> PaymentRef:
    return PaymentRef(
        provider_payment_id=payment_id, created_at=NOW, amount=Decimal(29), currency="USDT"
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeNowPayments]:
    async with FakeNowPayments(hang_seconds=2.0) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def client(
    fake: FakeNowPayments, session: aiohttp.ClientSession, budget: RequestBudget | None = None
) -> NowPaymentsStatus:
    config = NowPaymentsConfig(api_base_url=fake.url, api_key=fake.api_key, timeout_seconds=0.3)
    return NowPaymentsStatus(config, session=lambda: session, budget=budget)


class TestStatus:
    async def test_answer_is_read_with_exact_amounts_and_the_api_key_is_sent(
        self, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """GET /v1/payment/{id} with x-api-key; amounts stay Decimal, updated_at is parsed."""
        fake.script_status(
            "5001",
            status_answer("5001", "partially_paid", NOW, actually_paid=Decimal("12.3456789")),
        )

        payment = await client(fake, session).payment_status(ref(), NOW)

        assert payment.payment_id == "5001"
        assert payment.status == "partially_paid"
        assert payment.actually_paid == Decimal("12.3456789")
        assert payment.outcome_amount == Decimal("28.5")
        assert payment.updated_at == NOW
        request = fake.requests[-1]
        assert (request.method, request.path) == ("GET", "/v1/payment/5001")
        assert request.headers["x-api-key"] == fake.api_key

    @pytest.mark.parametrize(
        ("mode", "error"),
        [
            (Mode.SERVER_ERROR, ProviderTransientError),
            (Mode.UNAVAILABLE, ProviderTransientError),
            (Mode.HANG, ProviderTransientError),
            (Mode.MALFORMED_JSON, ProviderInvalidAnswer),
            (Mode.UNAUTHORIZED, ProviderPermanentError),
            (Mode.FORBIDDEN, ProviderPermanentError),
            (Mode.NOT_FOUND, ProviderPermanentError),
        ],
    )
    async def test_failures_are_classified_once(
        self,
        fake: FakeNowPayments,
        session: aiohttp.ClientSession,
        mode: Mode,
        error: type[Exception],
    ) -> None:
        """5xx, timeouts and bad JSON are transient; 401/403/404 are refusals."""
        fake.script_status("5001", mode)
        with pytest.raises(error) as caught:
            await client(fake, session).payment_status(ref(), NOW)
        assert fake.api_key not in str(caught.value)
        if error is ProviderTransientError:
            assert not isinstance(caught.value, ProviderInvalidAnswer)

    async def test_an_invoice_without_payment_id_is_refused_without_a_call(
        self, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """An empty provider id never becomes a request to another endpoint."""
        with pytest.raises(ProviderPermanentError):
            await client(fake, session).payment_status(ref(" "), NOW)
        assert fake.requests == []

    async def test_rate_limit_honours_retry_after_and_pauses_the_budget(
        self, fake: FakeNowPayments, session: aiohttp.ClientSession
    ) -> None:
        """A 429 carries its Retry-After, and every caller of the budget waits that long."""
        clock = FakeClock(NOW)
        budget = RequestBudget(100, clock)
        fake.script_status("5001", Mode.RATE_LIMITED)

        with pytest.raises(ProviderRateLimited) as caught:
            await client(fake, session, budget).payment_status(ref(), NOW)

        assert caught.value.retry_after_seconds == RETRY_AFTER_SECONDS
        waited: list[bool] = []

        async def create() -> None:
            await budget.acquire()
            waited.append(True)

        async with anyio.create_task_group() as group:
            group.start_soon(create)
            await clock.advance(RETRY_AFTER_SECONDS - 1)
            assert waited == []
            await clock.advance(1)
        assert waited == [True]

    @pytest.mark.parametrize(
        ("header", "seconds"),
        [("7", 7.0), (None, 60.0), ("soon", 60.0), ("nan", 60.0), ("1e9", 3600.0), ("-3", 0.0)],
    )
    def test_retry_after_header_forms(self, header: str | None, seconds: float) -> None:
        """Retry-After in seconds is used, bounded; anything else means the default minute."""
        assert retry_after_seconds(header) == seconds


class TestIpnVerifier:
    def body(self) -> dict[str, object]:
        return ipn_body(status_answer("5001", "finished", NOW))

    def test_a_signed_body_is_accepted_whatever_its_key_order(self) -> None:
        """The signature is over the body re-serialised with sorted keys and no spaces."""
        body = self.body()
        reordered = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()
        payment = NowPaymentsIpnVerifier(SECRET).verify(reordered, ipn_signature(body, SECRET))
        assert (payment.payment_id, payment.status) == ("5001", "finished")
        assert payment.actually_paid == Decimal(29)

    @pytest.mark.parametrize("signature", [None, "", "00" * 64, "zz", "é"])
    def test_missing_or_bad_signatures_are_rejected(self, signature: str | None) -> None:
        """No signature, a wrong one or garbage: IpnRejected, before anything is read."""
        body = json.dumps(self.body()).encode()
        with pytest.raises(IpnRejected):
            NowPaymentsIpnVerifier(SECRET).verify(body, signature)

    def test_a_body_signed_with_another_secret_or_altered_is_rejected(self) -> None:
        """A forged notification or one changed after signing is refused."""
        body = self.body()
        forged = ipn_signature(body, "another-secret")
        altered = {**body, "payment_status": "refunded"}
        verifier = NowPaymentsIpnVerifier(SECRET)
        with pytest.raises(IpnRejected):
            verifier.verify(json.dumps(body).encode(), forged)
        with pytest.raises(IpnRejected):
            verifier.verify(json.dumps(altered).encode(), ipn_signature(body, SECRET))

    def test_the_secret_is_not_in_the_repr(self) -> None:
        """The verifier never shows its secret."""
        assert SECRET not in repr(NowPaymentsIpnVerifier(SECRET))


class TestBudget:
    async def test_requests_beyond_the_rate_wait_for_tokens(self) -> None:
        """With 2 requests per second, the third request in the same instant waits 0.5 s."""
        clock = FakeClock(NOW)
        budget = RequestBudget(2, clock)
        done: list[int] = []

        async def take(number: int) -> None:
            await budget.acquire()
            done.append(number)

        async with anyio.create_task_group() as group:
            for number in range(3):
                group.start_soon(take, number)
            await clock.settle()
            assert done == [0, 1]
            await clock.advance(0.5)
        assert done == [0, 1, 2]

    async def test_status_checks_leave_a_reserve_for_invoice_creation(self) -> None:
        """Low-priority takers stop before the bucket is empty; invoice creation still gets one."""
        clock = FakeClock(NOW)
        budget = RequestBudget(5, clock)
        polled: list[int] = []

        async def poll(number: int) -> None:
            await budget.acquire(low_priority=True)
            polled.append(number)

        async with anyio.create_task_group() as group:
            for number in range(5):
                group.start_soon(poll, number)
            await clock.settle()
            assert len(polled) == 3  # 5 tokens, 40 % of the bucket kept back
            with anyio.fail_after(1):  # a guard: creation does not wait behind the pollers
                await budget.acquire()
                await budget.acquire()
            assert clock.deadlines and len(polled) == 3
            group.cancel_scope.cancel()
