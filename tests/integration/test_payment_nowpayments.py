"""The NOWPayments adapter against a local fake over real HTTP: mapping, retries, errors."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import pytest
from structlog.testing import capture_logs

from nproxyd.adapters.payment_nowpayments import NowPaymentsProvider
from nproxyd.core.config import NowPaymentsConfig
from nproxyd.core.errors import ProviderError, ProviderPermanentError, ProviderTransientError
from nproxyd.core.ports import InvoiceRequest, PaymentProvider
from nproxyd.core.text import is_storable
from tests.fakes.nowpayments import FakeNowPayments, Mode

NOW = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
TIMEOUT_SECONDS = 0.3

pytestmark = pytest.mark.anyio


class RecordingSleep:
    """An injected sleep for the adapter's backoff: records, never waits."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_request(order_id: str = "renewal:sub-1:c1", amount: str = "29.00") -> InvoiceRequest:
    return InvoiceRequest(
        order_id=order_id,
        subscription_id="sub-1",
        user_id="user-1",
        plan_code="pro",
        amount_usd=Decimal(amount),
        currency="USDT",
        description="nproxy pro renewal",
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeNowPayments]:
    async with FakeNowPayments(hang_seconds=3.0) as server:
        yield server


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


def make_provider(
    url: str, api_key: str, sleep: RecordingSleep, session: aiohttp.ClientSession | None = None
) -> NowPaymentsProvider:
    config = NowPaymentsConfig(
        api_base_url=url,
        api_key=api_key,
        pay_currency="usdttrc20",
        timeout_seconds=TIMEOUT_SECONDS,
    )
    return NowPaymentsProvider(config, session, sleep=sleep)


@pytest.fixture
async def provider(
    fake: FakeNowPayments, sleep: RecordingSleep
) -> AsyncIterator[NowPaymentsProvider]:
    adapter = make_provider(fake.url, fake.api_key, sleep)
    yield adapter
    await adapter.aclose()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class TestSuccess:
    async def test_created_payment_is_mapped(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A 201 answer becomes a ProviderInvoice with id, address, amount, currency, expiry."""
        invoice = await provider.create_invoice(make_request(), NOW)
        payment = fake.payments[0]
        assert invoice.provider_invoice_id == payment["payment_id"]
        assert invoice.payment_address == payment["pay_address"]
        assert invoice.pay_amount == Decimal("29.00")
        assert invoice.pay_currency == "usdttrc20"
        assert invoice.expires_at is not None
        assert invoice.expires_at.tzinfo is not None
        assert (
            invoice.expires_at.strftime("%Y-%m-%dT%H:%M:%S")
            == payment["expiration_estimate_date"][:19]
        )

    async def test_numeric_payment_id_becomes_string(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A payment_id sent as a JSON number is returned as its decimal string."""
        fake.numeric_ids = True
        invoice = await provider.create_invoice(make_request(), NOW)
        assert isinstance(fake.payments[0]["payment_id"], int)
        assert invoice.provider_invoice_id == str(fake.payments[0]["payment_id"])

    async def test_amounts_stay_exact_decimals(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """pay_amount with more digits than a float holds arrives exact, never via float."""
        fake.pay_amount = Decimal("1234567.123456789012")
        invoice = await provider.create_invoice(make_request(amount="12.34"), NOW)
        assert invoice.pay_amount == Decimal("1234567.123456789012")
        assert fake.requests[0].json["price_amount"] == Decimal("12.34")

    async def test_request_body_and_header(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """The request carries the API key header and the documented JSON fields."""
        await provider.create_invoice(make_request(order_id="renewal:sub-9:c3"), NOW)
        [recorded] = fake.requests
        assert recorded.method == "POST"
        assert recorded.path == "/v1/payment"
        assert recorded.headers["x-api-key"] == fake.api_key
        assert b'"price_amount":29.00' in recorded.body
        assert recorded.json == {
            "price_amount": Decimal("29.00"),
            "price_currency": "usd",
            "pay_currency": "usdttrc20",
            "order_id": "renewal:sub-9:c3",
            "order_description": "nproxy pro renewal",
        }

    async def test_expiry_falls_back_to_valid_until(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """Without expiration_estimate_date the expiry comes from valid_until."""
        fake.omit_fields = frozenset({"expiration_estimate_date"})
        invoice = await provider.create_invoice(make_request(), NOW)
        assert invoice.expires_at is not None
        assert (
            invoice.expires_at.strftime("%Y-%m-%dT%H:%M:%S") == fake.payments[0]["valid_until"][:19]
        )

    async def test_no_expiry_fields_gives_no_expiry(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """Without any expiry field the invoice has no expiry rather than an invented one."""
        fake.omit_fields = frozenset({"expiration_estimate_date", "valid_until"})
        invoice = await provider.create_invoice(make_request(), NOW)
        assert invoice.expires_at is None

    async def test_shared_session_is_left_open(
        self, fake: FakeNowPayments, sleep: RecordingSleep
    ) -> None:
        """A session passed in is used and not closed by aclose; the caller owns it."""
        async with aiohttp.ClientSession() as session:
            adapter = make_provider(fake.url, fake.api_key, sleep, session)
            await adapter.create_invoice(make_request(), NOW)
            await adapter.aclose()
            assert not session.closed
            assert len(fake.requests) == 1

    async def test_owned_session_is_closed_by_aclose(
        self, fake: FakeNowPayments, sleep: RecordingSleep
    ) -> None:
        """aclose closes the session the adapter created, and a second aclose is harmless."""
        adapter = make_provider(fake.url, fake.api_key, sleep)
        await adapter.create_invoice(make_request(), NOW)
        session = adapter._session
        assert session is not None
        await adapter.aclose()
        await adapter.aclose()
        assert session.closed

    async def test_adapter_fits_port(self, provider: NowPaymentsProvider) -> None:
        """The adapter satisfies the PaymentProvider port under its configured name."""
        port: PaymentProvider = provider
        assert port.name == "nowpayments"


class TestRefusals:
    async def test_amount_minimal_is_permanent_with_code(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """400 AMOUNT_MINIMAL_ERROR is permanent, quotes the code, and is not retried."""
        fake.set_mode(Mode.AMOUNT_MINIMAL)
        with pytest.raises(ProviderPermanentError, match="AMOUNT_MINIMAL_ERROR") as caught:
            await provider.create_invoice(make_request(), NOW)
        assert "400" in str(caught.value)
        assert len(fake.requests) == 1

    @pytest.mark.parametrize("mode", [Mode.UNAUTHORIZED, Mode.FORBIDDEN])
    async def test_auth_failures_are_permanent(
        self, mode: Mode, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """401 and 403 are permanent and made exactly once."""
        fake.set_mode(mode)
        with pytest.raises(ProviderPermanentError):
            await provider.create_invoice(make_request(), NOW)
        assert len(fake.requests) == 1

    async def test_wrong_api_key_is_permanent(
        self, fake: FakeNowPayments, sleep: RecordingSleep
    ) -> None:
        """A key the provider does not know gives a permanent INVALID_API_KEY error."""
        adapter = make_provider(fake.url, "wrong-key-abcdef", sleep)
        try:
            with pytest.raises(ProviderPermanentError, match="INVALID_API_KEY"):
                await adapter.create_invoice(make_request(), NOW)
        finally:
            await adapter.aclose()

    async def test_malformed_json_is_permanent(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A 201 whose body is not JSON is a permanent invalid-response error."""
        fake.set_mode(Mode.MALFORMED_JSON)
        with pytest.raises(ProviderPermanentError, match="invalid response"):
            await provider.create_invoice(make_request(), NOW)
        assert len(fake.requests) == 1

    async def test_missing_fields_is_permanent(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A 201 without payment_id and pay_address is a permanent invalid-response error."""
        fake.set_mode(Mode.MISSING_FIELDS)
        with pytest.raises(ProviderPermanentError, match="invalid response"):
            await provider.create_invoice(make_request(), NOW)

    @pytest.mark.parametrize("missing", ["payment_id", "pay_address"])
    async def test_each_required_field_is_checked(
        self, missing: str, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """Either payment_id or pay_address alone missing makes the answer invalid."""
        fake.omit_fields = frozenset({missing})
        with pytest.raises(ProviderPermanentError, match=missing):
            await provider.create_invoice(make_request(), NOW)


class TestRetries:
    async def test_429_then_success_is_retried_inside_adapter(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider, sleep: RecordingSleep
    ) -> None:
        """HTTP 429 was not processed, so the adapter backs off and retries until it succeeds."""
        fake.fail_next(2, Mode.RATE_LIMITED)
        invoice = await provider.create_invoice(make_request(), NOW)
        assert invoice.provider_invoice_id == fake.payments[0]["payment_id"]
        assert fake.calls_for("renewal:sub-1:c1") == 3
        assert len(sleep.calls) == 2
        assert all(seconds > 0 for seconds in sleep.calls)

    async def test_503_then_success_is_retried(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """HTTP 503 (not processed) is retried inside the adapter."""
        fake.fail_next(1, Mode.UNAVAILABLE)
        await provider.create_invoice(make_request(), NOW)
        assert [request.mode for request in fake.requests] == [Mode.UNAVAILABLE, Mode.OK]
        assert len(fake.payments) == 1

    async def test_persistent_503_gives_up_as_transient(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A provider that stays unavailable gets a few attempts, then a transient error."""
        fake.set_mode(Mode.UNAVAILABLE)
        with pytest.raises(ProviderTransientError, match="503"):
            await provider.create_invoice(make_request(), NOW)
        assert len(fake.requests) == 3

    async def test_500_is_transient_without_retry(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider, sleep: RecordingSleep
    ) -> None:
        """HTTP 500 leaves the outcome unknown: transient, exactly one request, no backoff."""
        fake.set_mode(Mode.SERVER_ERROR)
        with pytest.raises(ProviderTransientError, match="500") as caught:
            await provider.create_invoice(make_request(), NOW)
        assert not isinstance(caught.value, ProviderPermanentError)
        assert fake.calls_for("renewal:sub-1:c1") == 1
        assert sleep.calls == []

    async def test_hanging_provider_times_out_once(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider, sleep: RecordingSleep
    ) -> None:
        """A provider slower than timeout_seconds gives a transient timeout after one request."""
        fake.set_mode(Mode.HANG)
        with pytest.raises(ProviderTransientError, match="did not answer"):
            await provider.create_invoice(make_request(), NOW)
        assert len(fake.requests) == 1
        assert sleep.calls == []

    async def test_connection_refused_is_transient_and_retried(self, sleep: RecordingSleep) -> None:
        """Nothing listening is a transient error, retried in the adapter before giving up."""
        adapter = make_provider(closed_port_url(), "key-for-closed-port", sleep)
        try:
            with pytest.raises(ProviderTransientError, match="cannot connect"):
                await adapter.create_invoice(make_request(), NOW)
        finally:
            await adapter.aclose()
        assert len(sleep.calls) == 2


SECRET = "np-SECRET-api-key-7c1e9f"


class TestSecrets:
    @pytest.mark.parametrize(
        "mode",
        [
            Mode.AMOUNT_MINIMAL,
            Mode.FORBIDDEN,
            Mode.RATE_LIMITED,
            Mode.SERVER_ERROR,
            Mode.UNAVAILABLE,
            Mode.HANG,
            Mode.MALFORMED_JSON,
            Mode.MISSING_FIELDS,
        ],
    )
    async def test_api_key_never_in_errors_or_logs(self, mode: Mode, sleep: RecordingSleep) -> None:
        """No failure mode puts the API key into the exception's str/repr, its cause or logs."""
        async with FakeNowPayments(api_key=SECRET, hang_seconds=3.0) as fake:
            fake.set_mode(mode)
            adapter = make_provider(fake.url, SECRET, sleep)
            try:
                with capture_logs() as logs, pytest.raises(ProviderError) as caught:
                    await adapter.create_invoice(make_request(), NOW)
            finally:
                await adapter.aclose()
        texts = [str(caught.value), repr(caught.value), repr(adapter), repr(logs)]
        cause = caught.value.__cause__
        if cause is not None:
            texts += [str(cause), repr(cause)]
        assert not [text for text in texts if SECRET in text]

    async def test_api_key_never_in_connect_error(self, sleep: RecordingSleep) -> None:
        """A connection failure names the URL but never the API key."""
        adapter = make_provider(closed_port_url(), SECRET, sleep)
        try:
            with capture_logs() as logs, pytest.raises(ProviderTransientError) as caught:
                await adapter.create_invoice(make_request(), NOW)
        finally:
            await adapter.aclose()
        assert "127.0.0.1" in str(caught.value)
        texts = [str(caught.value), repr(caught.value), str(caught.value.__cause__), repr(logs)]
        assert logs, "the retries are logged"
        assert not [text for text in texts if SECRET in text]

    async def test_provider_text_echoing_key_is_scrubbed(self, sleep: RecordingSleep) -> None:
        """If the provider quotes the key in its error message, the adapter redacts it."""
        async with FakeNowPayments(api_key=SECRET) as fake:
            fake.set_mode(Mode.AMOUNT_MINIMAL)
            fake.error_message = f"amount too small for key {SECRET}"
            adapter = make_provider(fake.url, SECRET, sleep)
            try:
                with pytest.raises(ProviderPermanentError) as caught:
                    await adapter.create_invoice(make_request(), NOW)
            finally:
                await adapter.aclose()
        assert "amount too small for key ***" in str(caught.value)
        assert SECRET not in str(caught.value)


class TestFakeInThread:
    async def test_fake_serves_from_its_own_thread(self, sleep: RecordingSleep) -> None:
        """The fake runs in a background thread (for subprocess tests) and still switches modes."""
        with FakeNowPayments().running_in_thread() as fake:
            adapter = make_provider(fake.url, fake.api_key, sleep)
            try:
                fake.fail_next(1, Mode.SERVER_ERROR)
                with pytest.raises(ProviderTransientError):
                    await adapter.create_invoice(make_request(order_id="o-1"), NOW)
                invoice = await adapter.create_invoice(make_request(order_id="o-1"), NOW)
            finally:
                await adapter.aclose()
            assert fake.calls_for("o-1") == 2
            assert invoice.provider_invoice_id == fake.payments[0]["payment_id"]
        with pytest.raises(RuntimeError):
            _ = fake.url


async def permanent_message(
    fake: FakeNowPayments, provider: NowPaymentsProvider, mode: Mode
) -> str:
    """The message of the permanent error an invoice request gets when the stand-in answers
    with ``mode``."""
    fake.set_mode(mode)
    with pytest.raises(ProviderPermanentError) as caught:
        await provider.create_invoice(make_request(order_id="renewal-sub-1-7"), NOW)
    return caught.value.message


class TestHostileAnswers:
    @pytest.mark.parametrize(
        "mode",
        [
            Mode.NUL_ADDRESS,
            Mode.INVALID_UTF8,
            Mode.MISSING_ID,
            Mode.BAD_AMOUNT,
            Mode.BAD_DATE,
            Mode.LONG_FIELD,
            Mode.DEEP_JSON,
            Mode.HUGE_BODY,
        ],
        ids=lambda mode: mode.value,
    )
    async def test_untrustworthy_answer_is_permanent_and_names_the_payment(
        self, mode: Mode, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A 201 that cannot be trusted is permanent, storable, naming order and payment ids."""
        message = await permanent_message(fake, provider, mode)
        assert is_storable(message)
        assert "for order renewal-sub-1-7" in message
        [payment] = fake.payments
        if mode not in (Mode.MISSING_ID, Mode.DEEP_JSON, Mode.HUGE_BODY):  # not read: not named
            assert f"(payment {payment['payment_id']})" in message
        assert len(fake.requests) == 1

    async def test_refusal_that_is_not_utf8_is_permanent(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A 400 whose body is Latin-1 is a permanent refusal, its text made storable."""
        message = await permanent_message(fake, provider, Mode.REFUSED_LATIN1)
        assert is_storable(message)
        assert "HTTP 400 INVALID_REQUEST_PARAMS: Zur\ufffdckgewiesen" in message
        assert "for order renewal-sub-1-7" in message

    async def test_refusal_nested_too_deep_to_decode_is_permanent(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A 400 whose body nests deeper than the decoder recurses is a plain refusal."""
        assert "(HTTP 400)" in await permanent_message(fake, provider, Mode.REFUSED_DEEP)

    async def test_refusal_with_a_nul_is_cleaned(
        self, fake: FakeNowPayments, provider: NowPaymentsProvider
    ) -> None:
        """A NUL in a provider's error message never reaches the error text."""
        message = await permanent_message(fake, provider, Mode.REFUSED_NUL)
        assert "\x00" not in message
        assert "[invalid text replaced]" in message
