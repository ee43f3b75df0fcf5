"""NOWPayments over aiohttp: ``POST {api_base_url}/payment``.

Errors are translated once, in :func:`_map_errors` and :meth:`NowPaymentsProvider._check_status`.
Only failures that prove the provider never processed the request (no connection, HTTP 429,
HTTP 503) are retried here. A timeout, a dropped connection or another 5xx leaves the outcome
unknown (the payment may exist), so it surfaces at once as a transient error and the caller,
which holds the idempotency claim, decides.

The API key is sent only as a request header. It is never part of an exception, a log line or
this object's ``repr``; provider-supplied text is scrubbed of it before it is quoted.

Answers are checked before they are trusted (:mod:`nproxyd.core.answers`): a body that is not
valid UTF-8 or not the expected JSON, a missing payment id or address, a NUL, an unparseable
amount or date or an implausibly long field is permanent, and the error names the order id and
the payment id if any, so an operator can cancel the payment at the provider.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal

import aiohttp
import msgspec
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from nproxyd.adapters.http_body import MAX_ANSWER_BYTES, read_bounded
from nproxyd.core.answers import MAX_PAYMENT_ID_LENGTH, checked_invoice, invalid_answer
from nproxyd.core.budget import RequestBudget
from nproxyd.core.clock import SystemClock, parse_instant
from nproxyd.core.config import NowPaymentsConfig, redact_text
from nproxyd.core.errors import ProviderPermanentError, ProviderTransientError
from nproxyd.core.ports import InvoiceRequest, ProviderInvoice
from nproxyd.core.text import storable

Sleep = Callable[[float], Awaitable[None]]

_log = structlog.get_logger(__name__)

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_MAX_QUOTED = 200  # characters of provider text quoted in an error


class ProviderNotProcessedError(ProviderTransientError):
    """The payment provider did not process the request; repeating it is safe."""


class _PaymentBody(msgspec.Struct, frozen=True, kw_only=True):
    price_amount: Decimal
    price_currency: str
    pay_currency: str
    order_id: str
    order_description: str


class _PaymentAnswer(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str | int | None = None
    pay_address: str | None = None
    pay_amount: Decimal | None = None
    pay_currency: str | None = None
    expiration_estimate_date: str | None = None
    valid_until: str | None = None


class _ErrorAnswer(msgspec.Struct, frozen=True, kw_only=True):
    code: str | None = None
    message: str | None = None


class NowPaymentsProvider:
    """Creates NOWPayments payments; owns ``session`` only if it created it."""

    name = "nowpayments"

    def __init__(
        self,
        config: NowPaymentsConfig,
        session: aiohttp.ClientSession | None = None,
        *,
        sleep: Sleep | None = None,
        max_attempts: int = 3,
        backoff_initial_seconds: float = 0.2,
        backoff_max_seconds: float = 2.0,
        budget: RequestBudget | None = None,
    ) -> None:
        self.budget = budget  # shared with the status checks of the same account
        self._config = config
        self._url = config.api_base_url.rstrip("/") + "/payment"
        self._session = session
        self._owns_session = session is None
        self._sleep = sleep if sleep is not None else SystemClock().sleep
        self._max_attempts = max_attempts
        self._wait = wait_exponential_jitter(
            multiplier=backoff_initial_seconds,
            max=backoff_max_seconds,
            jitter=backoff_initial_seconds,
        )
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_seconds)

    def __repr__(self) -> str:
        return f"NowPaymentsProvider(url={self._url!r}, pay_currency={self._config.pay_currency!r})"

    async def create_invoice(self, request: InvoiceRequest, now: datetime) -> ProviderInvoice:
        body = _ENCODER.encode(
            _PaymentBody(
                price_amount=request.amount_usd,
                price_currency="usd",
                pay_currency=self._config.pay_currency,
                order_id=request.order_id,
                order_description=request.description,
            )
        )
        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(ProviderNotProcessedError),
            before_sleep=self._log_retry,
            reraise=True,
        )
        answer: tuple[int, bytes | None] = await retrying(self._post, body)
        status, payload = answer
        self._check_status(status, payload or b"", request.order_id)
        if payload is None:  # a payment may exist: permanent, as any untrustworthy answer
            raise _invalid(request.order_id, None, f"more than {MAX_ANSWER_BYTES} bytes")
        return _parse_invoice(payload, request.order_id)

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _post(self, body: bytes) -> tuple[int, bytes | None]:
        if self.budget is not None:
            await self.budget.acquire()
        headers = {"x-api-key": self._config.api_key, "Content-Type": "application/json"}
        with _map_errors(self._url, self._config.timeout_seconds):
            async with self._client().post(
                self._url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                payload = await read_bounded(response)  # None: over MAX_ANSWER_BYTES
                status = response.status
        if status in (429, 503):
            raise ProviderNotProcessedError(
                "nowpayments did not process the request"
                f" (HTTP {status}{self._detail(payload or b'')})"
            )
        return status, payload

    def session(self) -> aiohttp.ClientSession:
        """The HTTP session, shared with the payment status checks."""
        return self._client()

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _check_status(self, status: int, payload: bytes, order_id: str) -> None:
        if 200 <= status < 300:
            return
        detail = self._detail(payload)
        if status >= 500:
            raise ProviderTransientError(
                f"nowpayments failed with HTTP {status}{detail} for order {order_id};"
                " outcome unknown"
            )
        raise ProviderPermanentError(
            f"nowpayments refused the payment for order {order_id} (HTTP {status}{detail})"
        )

    def _detail(self, payload: bytes) -> str:
        """``": CODE: message"`` from a provider error body, scrubbed of the API key."""
        try:
            # Replaced, not refused: a body that is not valid UTF-8 is still an answer.
            text = payload.decode("utf-8", errors="replace")
            answer = msgspec.json.decode(text, type=_ErrorAnswer)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return ""
        parts = [part for part in (answer.code, answer.message) if part]
        if not parts:
            return ""
        quoted = redact_text(": ".join(parts), [self._config.api_key])
        return " " + storable(quoted, _MAX_QUOTED)

    async def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        _log.warning(
            "payment_provider_retrying",
            provider=self.name,
            attempt=state.attempt_number,
            error=str(error),
        )


@contextmanager
def _map_errors(url: str, timeout_seconds: float) -> Iterator[None]:
    """Translate aiohttp's exceptions into the project's tree, deciding once what may retry."""
    try:
        yield
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        raise ProviderNotProcessedError(
            f"cannot connect to nowpayments at {url} ({type(exc).__name__})"
        ) from exc
    except TimeoutError as exc:
        raise ProviderTransientError(
            f"nowpayments did not answer within {timeout_seconds} s; outcome unknown"
        ) from exc
    except aiohttp.ClientError as exc:
        raise ProviderTransientError(
            f"nowpayments request failed ({type(exc).__name__}); outcome unknown"
        ) from exc


def _parse_invoice(payload: bytes, order_id: str) -> ProviderInvoice:
    try:
        answer = msgspec.json.decode(payload, type=_PaymentAnswer)
    except (
        msgspec.DecodeError,
        msgspec.ValidationError,
        UnicodeDecodeError,
        RecursionError,  # nested deeper than the decoder recurses: no more readable than bad JSON
    ) as exc:
        problem = (
            "the answer is not valid UTF-8"
            if isinstance(exc, UnicodeDecodeError)
            else f"the answer is not the expected JSON ({exc})"
        )
        raise _invalid(order_id, _payment_id_in(payload), problem) from None
    if answer.payment_id is None or answer.payment_id == "":
        raise _invalid(order_id, None, "no payment_id")
    payment_id = storable(str(answer.payment_id), MAX_PAYMENT_ID_LENGTH)
    if not answer.pay_address:
        raise _invalid(order_id, payment_id, "no pay_address")
    invoice = ProviderInvoice(
        provider_invoice_id=str(answer.payment_id),
        payment_address=answer.pay_address,
        pay_amount=answer.pay_amount,
        pay_currency=answer.pay_currency,
        expires_at=_expiry(answer, order_id, payment_id),
    )
    return checked_invoice(invoice, provider="nowpayments", order_id=order_id)


def _invalid(order_id: str, payment_id: str | None, problem: str) -> ProviderPermanentError:
    return invalid_answer("nowpayments", order_id, payment_id, problem)


def _payment_id_in(payload: bytes) -> str | None:
    """The payment id of an answer that failed to parse, if one can be read at all."""
    try:
        value = msgspec.json.decode(payload.decode("utf-8", errors="replace"))
    except (msgspec.DecodeError, RecursionError):
        return None
    payment_id = value.get("payment_id") if isinstance(value, dict) else None
    if isinstance(payment_id, str | int) and not isinstance(payment_id, bool):
        return storable(str(payment_id), MAX_PAYMENT_ID_LENGTH) or None
    return None


def _expiry(answer: _PaymentAnswer, order_id: str, payment_id: str) -> datetime | None:
    for field in ("expiration_estimate_date", "valid_until"):
        text = getattr(answer, field)
        if not text:
            continue
        try:
            return parse_instant(text)
        except (ValueError, OverflowError):
            quoted = storable(text, _MAX_QUOTED)
            raise _invalid(order_id, payment_id, f"bad {field} {quoted!r}") from None
    return None
