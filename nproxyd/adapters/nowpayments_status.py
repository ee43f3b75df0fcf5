"""NOWPayments payment status: ``GET {api_base_url}/payment/{payment_id}``, and signed IPNs.

It shares the HTTP session and the request budget of :class:`NowPaymentsProvider`. Errors are
classified once, here: 429 (with ``Retry-After``), 5xx, timeouts and unreadable answers are
transient; 401 and 403 refuse the API key (:class:`ProviderCredentialsRefused`, every check
fails alike); 404 and other 4xx refuse that one payment. Every text the provider sends is checked
(no NUL, no invalid text) and bounded before it can reach a statement, and every number and
date is validated, so one bad answer fails only its own invoice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from nproxyd.adapters.http_body import MAX_ANSWER_BYTES, read_bounded
from nproxyd.adapters.js_json import js_stringify_sorted
from nproxyd.core.budget import RequestBudget
from nproxyd.core.clock import parse_instant
from nproxyd.core.config import NowPaymentsConfig
from nproxyd.core.errors import (
    IpnRejected,
    ProviderCredentialsRefused,
    ProviderInvalidAnswer,
    ProviderPermanentError,
    ProviderRateLimited,
    ProviderTransientError,
)
from nproxyd.core.payments import PaymentRef, ProviderPayment
from nproxyd.core.text import is_storable, storable

_DECODER = msgspec.json.Decoder(float_hook=Decimal)  # amounts stay exact
_MAX_TEXT = 200
_MAX_AMOUNT = Decimal(10) ** 20
# Decimal places an amount may have: far beyond any currency, far within PostgreSQL's numeric
# (16,383), whose driver refuses a larger scale or exponent for a whole statement.
_MAX_DECIMALS = 100
DEFAULT_RETRY_AFTER_SECONDS = 60.0
MAX_RETRY_AFTER_SECONDS = 3600.0


class NowPaymentsStatus:
    """Reads payment statuses; borrows the session of the invoice-creating provider."""

    name = "nowpayments"

    def __init__(
        self,
        config: NowPaymentsConfig,
        *,
        session: Callable[[], aiohttp.ClientSession],
        budget: RequestBudget | None = None,
    ) -> None:
        self._config = config
        self._base = config.api_base_url.rstrip("/") + "/payment/"
        self._session = session
        self._budget = budget
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_seconds)

    def __repr__(self) -> str:
        return f"NowPaymentsStatus(url={self._base!r})"

    async def payment_status(self, ref: PaymentRef, now: datetime) -> ProviderPayment:
        if not ref.provider_payment_id.strip():
            raise ProviderPermanentError("invoice has no nowpayments payment id")
        if self._budget is not None:
            await self._budget.acquire(low_priority=True)
        url = self._base + quote(ref.provider_payment_id, safe="")
        with _map_errors(self._config.timeout_seconds):
            async with self._session().get(
                url,
                headers={"x-api-key": self._config.api_key},
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                payload = await read_bounded(response)
                status = response.status
                retry_after = response.headers.get("Retry-After")
        self._check_status(status, retry_after, ref.provider_payment_id)
        if payload is None:
            raise ProviderInvalidAnswer(f"nowpayments answered more than {MAX_ANSWER_BYTES} bytes")
        return parse_payment(payload, ref.provider_payment_id)

    def _check_status(self, status: int, retry_after: str | None, payment_id: str) -> None:
        if 200 <= status < 300:
            return
        if status == 429:
            seconds = retry_after_seconds(retry_after)
            if self._budget is not None:
                self._budget.pause(seconds)
            raise ProviderRateLimited(
                f"nowpayments rate limit (HTTP 429), retry after {seconds:g} s",
                retry_after_seconds=seconds,
            )
        if status >= 500:
            raise ProviderTransientError(f"nowpayments failed with HTTP {status}")
        if status in (401, 403):
            raise ProviderCredentialsRefused(
                f"nowpayments refused the API key (HTTP {status}): every status check fails"
            )
        raise ProviderPermanentError(
            f"nowpayments refused the status of payment {storable(payment_id, 80)} (HTTP {status})"
        )


class NowPaymentsIpnVerifier:
    """Checks ``x-nowpayments-sig``: hex HMAC-SHA512 of the body re-serialised with sorted keys.

    Re-serialised the Python way or the JavaScript way (see :func:`_signed_forms`).
    """

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode("utf-8")

    def __repr__(self) -> str:
        return "NowPaymentsIpnVerifier(secret='***')"

    def verify(self, body: bytes, signature: str | None) -> ProviderPayment:
        if not signature:
            raise IpnRejected("missing x-nowpayments-sig")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise IpnRejected("body is not JSON") from None
        if not isinstance(document, dict):
            raise IpnRejected("body is not a JSON object")
        given = signature.strip().lower().encode("utf-8", "replace")
        try:
            forms = _signed_forms(document)
        except RecursionError:  # parsed, but nested too deep to write again
            raise IpnRejected("body is nested too deep") from None
        matches = [hmac.compare_digest(self._digest(form), given) for form in forms]
        if not any(matches):
            raise IpnRejected("bad x-nowpayments-sig")
        return parse_payment(body, None)

    def _digest(self, canonical: str) -> bytes:
        digest = hmac.new(self._secret, canonical.encode("utf-8"), hashlib.sha512).hexdigest()
        return digest.encode("ascii")


def _signed_forms(document: dict[str, Any]) -> tuple[str, str]:
    """The two texts a signature may be made over, both deterministic forms of ``document``.

    Python's (sorted keys, non-ASCII escaped, ``5e-05``) and JavaScript's, as NOWPayments'
    examples sign (``JSON.stringify`` with keys sorted at every level: raw UTF-8, ``0.00005``,
    ``1e-7``). Accepting either does not weaken the HMAC: both are functions of the whole
    parsed body, nested objects included.
    """
    python = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return python, js_stringify_sorted(document)


def retry_after_seconds(header: str | None) -> float:
    """Seconds of a ``Retry-After`` header (delta-seconds form), bounded; a default without."""
    try:
        seconds = float(header) if header is not None else DEFAULT_RETRY_AFTER_SECONDS
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS
    if math.isnan(seconds):
        return DEFAULT_RETRY_AFTER_SECONDS
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def parse_payment(payload: bytes, requested_id: str | None) -> ProviderPayment:
    """A provider payment from a status answer or an IPN body; raises ProviderInvalidAnswer."""
    try:
        document = _DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep
        raise ProviderInvalidAnswer("nowpayments answered invalid JSON") from None
    if not isinstance(document, dict):
        raise ProviderInvalidAnswer("nowpayments answered JSON that is not an object")
    answered_id = _text(document, "payment_id")
    if answered_id is not None and requested_id is not None and answered_id != requested_id:
        # An answer about another payment must never be recorded under the invoice that asked.
        raise ProviderInvalidAnswer(
            f"nowpayments answer: payment_id {storable(answered_id, 80)} is not the payment asked"
            f" about ({storable(requested_id, 80)})"
        )
    payment_id = answered_id or requested_id
    status = _text(document, "payment_status")
    if not payment_id or not status:
        raise ProviderInvalidAnswer("nowpayments answer without payment_id or payment_status")
    return ProviderPayment(
        payment_id=payment_id,
        status=status,
        actually_paid=_amount(document, "actually_paid"),
        pay_amount=_amount(document, "pay_amount"),
        pay_currency=_text(document, "pay_currency"),
        outcome_amount=_amount(document, "outcome_amount"),
        outcome_currency=_text(document, "outcome_currency"),
        updated_at=_instant(document, "updated_at"),
    )


def _text(document: dict[str, Any], field: str) -> str | None:
    value = document.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} is not text")
    text = str(value)
    if not is_storable(text):
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} holds unstorable text")
    return storable(text, _MAX_TEXT)


def _amount(document: dict[str, Any], field: str) -> Decimal | None:
    value = document.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} is not a number")
    try:
        amount = Decimal(value)
    except (InvalidOperation, ValueError):
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} is not a number") from None
    if not amount.is_finite() or amount < 0 or amount >= _MAX_AMOUNT:
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} is out of range")
    exponent = amount.as_tuple().exponent
    if not isinstance(exponent, int) or not -_MAX_DECIMALS <= exponent <= 20:  # e.g. 0E+300000
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} has an implausible precision")
    return amount


def _instant(document: dict[str, Any], field: str) -> datetime | None:
    value = document.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not is_storable(value):
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} is not a time")
    try:
        return parse_instant(value)
    except (ValueError, OverflowError):
        raise ProviderInvalidAnswer(f"nowpayments answer: {field} is not a time") from None


@contextmanager
def _map_errors(timeout_seconds: float) -> Iterator[None]:
    """A status check changes nothing at the provider: every network failure is transient."""
    try:
        yield
    except TimeoutError as exc:
        raise ProviderTransientError(
            f"nowpayments did not answer within {timeout_seconds} s"
        ) from exc
    except aiohttp.ClientError as exc:
        raise ProviderTransientError(
            f"nowpayments status request failed ({type(exc).__name__})"
        ) from exc
