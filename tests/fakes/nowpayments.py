"""A local NOWPayments: ``POST /v1/payment`` over real HTTP, with switchable failure modes.

Use it as an async context manager in the test's event loop::

    async with FakeNowPayments() as fake:
        config = NowPaymentsConfig(api_base_url=fake.url, api_key=fake.api_key)

or, for tests that run the real daemon as a subprocess, in a thread with its own loop::

    with FakeNowPayments().running_in_thread() as fake:
        env["NPROXYD__PAYMENT__NOWPAYMENTS__API_BASE_URL"] = fake.url

Every request is recorded (``requests``, ``calls_for(order_id)``), successful ones also in
``payments``. State changes are guarded by a lock, so a test may switch modes from another
thread while the server runs. ``set_order_mode`` scripts the answer for one ``order_id``
(a hostile answer for one order among many).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import itertools
import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any

import msgspec
from aiohttp import web

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_DECODER = msgspec.json.Decoder(float_hook=Decimal)  # amounts stay exact
DEFAULT_API_KEY = "test-nowpayments-key-0123456789"


class Mode(enum.Enum):
    """How the fake answers a request."""

    OK = "ok"
    AMOUNT_MINIMAL = "amount_minimal"  # 400 AMOUNT_MINIMAL_ERROR
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403 INVALID_API_KEY
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 500
    UNAVAILABLE = "unavailable"  # 503
    HANG = "hang"  # answers only after hang_seconds
    MALFORMED_JSON = "malformed_json"  # 201 with a body that is not JSON
    MISSING_FIELDS = "missing_fields"  # 201 without payment_id and pay_address
    # Hostile answers (a payment is created, its answer cannot be trusted):
    NUL_ADDRESS = "nul_address"  # 201 whose pay_address holds a NUL (JSON \u0000)
    INVALID_UTF8 = "invalid_utf8"  # 201 whose body has a byte that is not UTF-8
    MISSING_ID = "missing_id"  # 201 without payment_id
    BAD_AMOUNT = "bad_amount"  # 201 whose pay_amount is not a number
    BAD_DATE = "bad_date"  # 201 whose dates cannot be parsed
    LONG_FIELD = "long_field"  # 201 whose pay_address is 10,000 characters
    DEEP_JSON = "deep_json"  # 201 (200 for a status) with a field nesting arrays 100,000 deep
    HUGE_BODY = "huge_body"  # 201 (200 for a status) padded to HUGE_BODY_BYTES, valid otherwise
    # Hostile error answers:
    REFUSED_LATIN1 = "refused_latin1"  # 400 whose body is Latin-1, not UTF-8
    REFUSED_NUL = "refused_nul"  # 400 whose message holds a NUL
    REFUSED_DEEP = "refused_deep"  # 400 with a field nesting arrays 100,000 deep
    NOT_FOUND = "not_found"  # 404 (payment status)


_ERRORS: dict[Mode, tuple[int, str, str]] = {
    Mode.AMOUNT_MINIMAL: (400, "AMOUNT_MINIMAL_ERROR", "amountTo is too small"),
    Mode.UNAUTHORIZED: (401, "AUTH_REQUIRED", "Authorization header is empty"),
    Mode.FORBIDDEN: (403, "INVALID_API_KEY", "Invalid api key"),
    Mode.RATE_LIMITED: (429, "TOO_MANY_REQUESTS", "Too many requests"),
    Mode.SERVER_ERROR: (500, "INTERNAL_ERROR", "Internal server error"),
    Mode.UNAVAILABLE: (503, "SERVICE_UNAVAILABLE", "Service temporarily unavailable"),
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any  # the decoded body, or None when it was not JSON
    mode: Mode  # how it was answered

    @property
    def order_id(self) -> str | None:
        return self.json.get("order_id") if isinstance(self.json, dict) else None


@dataclass
class _State:
    mode: Mode = Mode.OK
    queued: deque[Mode] = field(default_factory=deque)
    by_order: dict[str, Mode] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    payments: list[dict[str, Any]] = field(default_factory=list)
    # Payment status answers per payment id: each a dict (the answer's fields) or a Mode.
    statuses: dict[str, deque[dict[str, Any] | Mode]] = field(default_factory=dict)


class _StatusMixin:
    """Payment status scripting for :class:`FakeNowPayments` (see ``script_status``)."""

    _lock: threading.Lock
    _state: _State
    api_key: str
    hang_seconds: float

    def script_status(self, payment_id: str, *answers: dict[str, Any] | Mode) -> None:
        """Answer GET /v1/payment/{payment_id} with ``answers`` in turn; the last one repeats."""
        with self._lock:
            self._state.statuses[payment_id] = deque(answers)

    def status_calls(self, payment_id: str) -> int:
        """How many status requests arrived for ``payment_id``."""
        path = f"/v1/payment/{payment_id}"
        with self._lock:
            return sum(1 for request in self._state.requests if request.path == path)

    def _next_status(self, payment_id: str) -> dict[str, Any] | Mode:
        with self._lock:
            queue = self._state.statuses.get(payment_id)
            if not queue:
                return Mode.NOT_FOUND
            return queue.popleft() if len(queue) > 1 else queue[0]


class FakeNowPayments(_StatusMixin):
    """The fake server. ``url`` (ending in ``/v1``) is set once it has started."""

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        *,
        hang_seconds: float = 5.0,
        numeric_ids: bool = False,
        valid_for: timedelta = timedelta(hours=24),
    ) -> None:
        self.api_key = api_key
        self.hang_seconds = hang_seconds
        self.numeric_ids = numeric_ids
        self.valid_for = valid_for
        self.pay_amount: Decimal | None = None  # answer this instead of the price
        self.omit_fields: frozenset[str] = frozenset()  # left out of a 201 answer
        self.error_message: str | None = None  # replaces the message of error answers
        self._state = _State()
        self._lock = threading.Lock()
        self._ids = itertools.count(5_000_000_001)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._url: str | None = None

    # -- control -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeNowPayments is not running")
        return self._url

    def set_mode(self, mode: Mode) -> None:
        """Answer every following request with ``mode`` (and forget queued failures)."""
        with self._lock:
            self._state.mode = mode
            self._state.queued.clear()

    def fail_next(self, count: int, mode: Mode) -> None:
        """Answer the next ``count`` requests with ``mode``, then go back to the current mode."""
        with self._lock:
            self._state.queued.extend([mode] * count)

    def set_order_mode(self, order_id: str, mode: Mode) -> None:
        """Answer every request for ``order_id`` with ``mode``, whatever the other modes."""
        with self._lock:
            self._state.by_order[order_id] = mode

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    @property
    def payments(self) -> list[dict[str, Any]]:
        """The payments the fake created (its 201 answers), oldest first."""
        with self._lock:
            return list(self._state.payments)

    def calls_for(self, order_id: str) -> int:
        """How many requests arrived for ``order_id``, whatever they were answered."""
        return sum(1 for request in self.requests if request.order_id == order_id)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/payment", self._create_payment)
        app.router.add_get("/v1/payment/{payment_id}", self._payment_status)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()  # releases hanging handlers at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._url = None

    async def __aenter__(self) -> FakeNowPayments:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextmanager
    def running_in_thread(self, startup_timeout: float = 10.0) -> Iterator[FakeNowPayments]:
        """Run the server in a daemon thread with its own event loop, for the duration."""
        started = threading.Event()
        loop = asyncio.new_event_loop()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=serve, name="fake-nowpayments", daemon=True)
        thread.start()
        if not started.wait(startup_timeout) or failure:
            raise RuntimeError(f"fake NOWPayments did not start: {failure}")
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(startup_timeout)

    # -- the endpoint --------------------------------------------------------------------

    async def _create_payment(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = _DECODER.decode(raw)
        except msgspec.DecodeError:
            body = None
        mode = self._record(request, raw, body)
        if request.headers.get("x-api-key") != self.api_key:
            return self._error(403, "INVALID_API_KEY", "Invalid api key")
        if not isinstance(body, dict) or "price_amount" not in body:
            return self._error(400, "INVALID_REQUEST_PARAMS", "price_amount is required")
        return await self._answer(mode, body)

    async def _payment_status(self, request: web.Request) -> web.StreamResponse:
        self._record(request, b"", None)
        if request.headers.get("x-api-key") != self.api_key:
            return self._error(403, "INVALID_API_KEY", "Invalid api key")
        answer = self._next_status(request.match_info["payment_id"])
        if isinstance(answer, dict):
            return web.Response(
                status=200, body=_ENCODER.encode(answer), content_type="application/json"
            )
        if answer is Mode.RATE_LIMITED:
            response = self._error(*_ERRORS[answer])
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        if answer is Mode.NOT_FOUND:
            return self._error(404, "PAYMENT_NOT_FOUND", "Payment not found")
        if answer is Mode.HANG:
            await self._hang()
            return self._error(504, "TIMEOUT", "too late")
        if answer is Mode.MALFORMED_JSON:
            return web.Response(
                status=200, body=b'{"payment_status": "fini', content_type="application/json"
            )
        if answer in (Mode.DEEP_JSON, Mode.HUGE_BODY):
            payment_id = request.match_info["payment_id"]
            valid = status_answer(payment_id, "finished", datetime.now(UTC))
            return web.Response(
                status=200, body=_hostile(answer, valid), content_type="application/json"
            )
        return self._error(*_ERRORS[answer])

    def _record(self, request: web.Request, raw: bytes, body: Any) -> Mode:
        with self._lock:
            state = self._state
            order_id = body.get("order_id") if isinstance(body, dict) else None
            if isinstance(order_id, str) and order_id in state.by_order:
                mode = state.by_order[order_id]
            else:
                mode = state.queued.popleft() if state.queued else state.mode
            state.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    headers=dict(request.headers),
                    body=raw,
                    json=body,
                    mode=mode,
                )
            )
        return mode

    async def _answer(self, mode: Mode, body: dict[str, Any]) -> web.StreamResponse:
        if mode in _ERRORS:
            return self._error(*_ERRORS[mode])
        if mode in _REFUSALS:
            return web.Response(status=400, body=_REFUSALS[mode], content_type="application/json")
        if mode is Mode.HANG:
            await self._hang()
        if mode is Mode.MALFORMED_JSON:
            return web.Response(
                status=201, body=b'{"payment_id": 1, "pay_addr', content_type="application/json"
            )
        payment = self._payment(body)
        omit = {"payment_id", "pay_address"} if mode is Mode.MISSING_FIELDS else self.omit_fields
        answer = {key: value for key, value in payment.items() if key not in omit}
        return web.Response(
            status=201, body=_hostile(mode, answer), content_type="application/json"
        )

    async def _hang(self) -> None:
        assert self._stopping is not None
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.hang_seconds)

    def _error(self, status: int, code: str, message: str) -> web.Response:
        text = self.error_message if self.error_message is not None else message
        body = {"status": False, "statusCode": status, "code": code, "message": text}
        return web.Response(
            status=status, body=_ENCODER.encode(body), content_type="application/json"
        )

    def _payment(self, body: dict[str, Any]) -> dict[str, Any]:
        created = datetime.now(UTC)
        number = next(self._ids)
        price = body["price_amount"]
        payment = {
            "payment_id": number if self.numeric_ids else str(number),
            "payment_status": "waiting",
            "pay_address": f"TFake{number:029d}",
            "price_amount": price,
            "price_currency": body.get("price_currency"),
            "pay_amount": self.pay_amount if self.pay_amount is not None else price,
            "pay_currency": body.get("pay_currency"),
            "order_id": body.get("order_id"),
            "order_description": body.get("order_description"),
            "created_at": _iso(created),
            "updated_at": _iso(created),
            "valid_until": _iso(created + self.valid_for),
            "expiration_estimate_date": _iso(created + self.valid_for),
        }
        with self._lock:
            self._state.payments.append(payment)
        return payment


HUGE_BODY_BYTES = 8 * 1024 * 1024
DEEP_ARRAYS = b"[" * 100_000 + b"]" * 100_000  # a JSON value deeper than any decoder recurses


def with_deep_field(encoded: bytes) -> bytes:
    """An encoded JSON object with one more field, ``nested``, holding :data:`DEEP_ARRAYS`."""
    return encoded[:-1] + b',"nested":' + DEEP_ARRAYS + b"}"


_REFUSALS: dict[Mode, bytes] = {
    Mode.REFUSED_LATIN1: (
        b'{"status": false, "statusCode": 400, "code": "INVALID_REQUEST_PARAMS",'
        b' "message": "Zur\xfcckgewiesen: order_description ung\xfcltig"}'
    ),
    Mode.REFUSED_NUL: (
        b'{"status": false, "statusCode": 400, "code": "INVALID_REQUEST_PARAMS",'
        b' "message": "bad\\u0000request"}'
    ),
    Mode.REFUSED_DEEP: (
        b'{"status": false, "statusCode": 400, "code": "INVALID_REQUEST_PARAMS", "details": '
        + DEEP_ARRAYS
        + b"}"
    ),
}


def _hostile(mode: Mode, answer: dict[str, Any]) -> bytes:
    """The 201 body for ``mode``: ``answer`` itself, or spoiled the way ``mode`` says."""
    answer = dict(answer)
    if mode is Mode.NUL_ADDRESS:
        answer["pay_address"] = f"{answer['pay_address']}\x00"
    elif mode is Mode.MISSING_ID:
        answer.pop("payment_id", None)
    elif mode is Mode.BAD_AMOUNT:
        answer["pay_amount"] = "twenty-nine"
    elif mode is Mode.BAD_DATE:
        answer["valid_until"] = answer["expiration_estimate_date"] = "soon, really"
    elif mode is Mode.LONG_FIELD:
        answer["pay_address"] = "T" * 10_000
    elif mode is Mode.HUGE_BODY:
        answer["padding"] = "x" * HUGE_BODY_BYTES
    encoded = _ENCODER.encode(answer)
    if mode is Mode.INVALID_UTF8:
        encoded = encoded.replace(b'"pay_address":"', b'"pay_address":"\xfc', 1)
    if mode is Mode.DEEP_JSON:
        encoded = with_deep_field(encoded)
    return encoded


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# -- payment status (GET /v1/payment/{id}) and signed IPNs --------------------------------------

RETRY_AFTER_SECONDS = 7


def status_answer(
    payment_id: str, status: str, updated_at: datetime, **fields: Any
) -> dict[str, Any]:
    """A payment status answer as NOWPayments sends it (amounts as JSON numbers)."""
    return {
        "payment_id": int(payment_id) if payment_id.isdigit() else payment_id,
        "payment_status": status,
        "pay_address": "TFakeAddress",
        "price_amount": 29,
        "price_currency": "usd",
        "pay_amount": Decimal("29"),
        "actually_paid": Decimal("29") if status in ("finished", "confirmed", "sending") else 0,
        "pay_currency": "usdttrc20",
        "order_id": f"order-{payment_id}",
        "outcome_amount": Decimal("28.5"),
        "outcome_currency": "usdttrc20",
        "created_at": _iso(updated_at - timedelta(minutes=5)),
        "updated_at": _iso(updated_at),
        **fields,
    }


def ipn_signature(body: dict[str, Any], secret: str) -> str:
    """``x-nowpayments-sig`` of ``body``: HMAC-SHA512 over the JSON with sorted keys."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret.encode(), canonical.encode(), hashlib.sha512).hexdigest()


def js_canonical(body: Any) -> str:
    """``body`` as NOWPayments' JavaScript signer writes it before signing.

    ``JSON.stringify`` with keys sorted (at every level, UTF-16 order): raw UTF-8 text and
    JavaScript number formatting (every number a double; fixed notation for decimal exponents
    in [-6, 21), so ``0.000001``, else ``1e-7`` / ``1e+21`` / ``1.5e+300``). Written
    independently of nproxyd's verifier.
    """
    if isinstance(body, dict):
        keys = sorted(body, key=lambda key: key.encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{js_canonical(body[k])}"
                              for k in keys) + "}"  # fmt: skip
    if isinstance(body, list):
        return "[" + ",".join(js_canonical(item) for item in body) + "]"
    if isinstance(body, bool) or body is None or isinstance(body, str):
        return json.dumps(body, ensure_ascii=False)
    number = Decimal(repr(float(body))).normalize()
    if number.is_zero():
        return "0"
    if -6 <= number.adjusted() < 21:
        return format(number, "f")
    return format(number, "e")


def ipn_signature_js(body: Any, secret: str) -> str:
    """``x-nowpayments-sig`` as a JavaScript signer makes it: HMAC-SHA512 of ``js_canonical``."""
    return hmac.new(secret.encode(), js_canonical(body).encode(), hashlib.sha512).hexdigest()


def ipn_body(answer: dict[str, Any]) -> dict[str, Any]:
    """An IPN body from a status answer: plain JSON types (amounts as floats, as sent)."""
    body: dict[str, Any] = json.loads(_ENCODER.encode(answer))
    return body


def send_ipn(url: str, body: dict[str, Any], secret: str, *, signature: str | None = None) -> int:
    """POST one signed notification (from synchronous test code); returns the HTTP status."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("x-nowpayments-sig", signature or ipn_signature(body, secret))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)
