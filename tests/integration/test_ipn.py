"""The IPN listener with the payment watcher and a real PostgreSQL, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from nproxyd.actors.payment_watcher import PaymentWatcher, PaymentWatcherPorts
from nproxyd.adapters.nowpayments_status import NowPaymentsIpnVerifier
from nproxyd.adapters.status_simulated import SimulatedPaymentStatus
from nproxyd.core.config import SimulatedPaymentConfig
from nproxyd.core.payments import IpnOutcome
from nproxyd.runtime.ipn import MAX_BODY_BYTES, IpnServer
from nproxyd.runtime.payment_metrics import PaymentMetrics
from nproxyd.runtime.prometheus import Registry
from nproxyd.store.database import Database
from nproxyd.store.payments import PaymentStore
from tests.fakes.clock import FakeClock
from tests.fakes.nowpayments import (
    ipn_body,
    ipn_signature,
    ipn_signature_js,
    js_canonical,
    status_answer,
)
from tests.integration.test_payment_watcher import (
    FAR_FUTURE,
    T0,
    add_invoice,
    history,
    settings,
)

pytestmark = pytest.mark.anyio

SECRET = "ipn-secret-for-tests"
# A notification as a JavaScript provider sends it, and the text JSON.stringify signs for it
# (node: JSON.stringify(params, Object.keys(params).sort())).
JS_BODY = (
    '{"payment_id":5001,"payment_status":"finished","pay_amount":0.00005,'
    '"actually_paid":1e-7,"price_amount":1e16,"pay_currency":"btc",'
    '"order_description":"Zahlung für Übung \u2013 東京","updated_at":"2026-03-10T12:00:00.000Z"}'
)
JS_CANONICAL = (
    '{"actually_paid":1e-7,"order_description":"Zahlung für Übung \u2013 東京",'
    '"pay_amount":0.00005,"pay_currency":"btc","payment_id":5001,'
    '"payment_status":"finished","price_amount":10000000000000000,'
    '"updated_at":"2026-03-10T12:00:00.000Z"}'
)

# A notification with NOWPayments' nested "fee" object, and node's HMAC-SHA512 (with SECRET)
# of JSON.stringify(params, Object.keys(params).sort()) for it: that call keeps only top-level
# names in nested objects, so it signs "fee" as {} and leaves its values unsigned.
FEE_BODY = (
    '{"payment_id":5001,"payment_status":"finished","pay_amount":29.05,"actually_paid":29.05,'
    '"pay_currency":"usdttrc20","fee":{"currency":"usdttrc20","depositFee":0.05,'
    '"withdrawalFee":0,"serviceFee":0.1455},"updated_at":"2026-03-10T12:00:00.000Z"}'
)
FEE_TOP_LEVEL_ONLY_SIGNATURE = (
    "67dd2a67c413f928215a259215b682dda0ec508f0f7ade1c166325713b6c1fc8"
    "57963e8bed3bcae478408fb7d6fc532aa89288f87f467c3fd43e93cc52db292c"
)


class Listener:
    def __init__(self, server: IpnServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.url = f"http://127.0.0.1:{server.port}/ipn/nowpayments"

    async def post(self, body: bytes, signature: str | None) -> int:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["x-nowpayments-sig"] = signature
        async with self.session.post(self.url, data=body, headers=headers) as response:
            return response.status

    async def send(self, answer: dict[str, Any], secret: str = SECRET) -> int:
        body = ipn_body(answer)
        return await self.post(json.dumps(body).encode(), ipn_signature(body, secret))

    def count(self, outcome: str) -> float:
        value = self.server.metrics.ipn_requests.labels(outcome=outcome).value
        return float(value)


@pytest.fixture
async def listener(db: Database) -> AsyncIterator[Listener]:
    ports = PaymentWatcherPorts(
        store=PaymentStore(db),
        source=SimulatedPaymentStatus(SimulatedPaymentConfig()),
        verifier=NowPaymentsIpnVerifier(SECRET),
    )
    watcher = PaymentWatcher(settings(), ports, FakeClock(T0))
    server = IpnServer(watcher, "127.0.0.1:0", PaymentMetrics(Registry()))
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Listener(server, session)
    finally:
        await server.stop()


class TestIpn:
    async def test_a_signed_notification_is_recorded_like_a_poll(
        self, db: Database, listener: Listener
    ) -> None:
        """200; the status, amounts and a history row with source ipn are stored."""
        await add_invoice(db, "5001")

        status = await listener.send(status_answer("5001", "finished", T0))

        assert status == 200
        row = await db.pool.fetchrow("SELECT * FROM nproxyd_invoice_payments")
        assert row is not None
        assert (row["invoice_id"], row["provider_status"]) == ("5001", "finished")
        assert row["last_notified_at"] == T0 and row["next_check_at"] is None
        assert await history(db, "5001") == [(None, "finished", "ipn")]
        assert listener.count("ok") == 1
        changes = listener.server.metrics.status_changes
        assert changes.labels(status="finished", source="ipn").value == 1

    async def test_a_forged_notification_is_refused_and_records_nothing(
        self, db: Database, listener: Listener
    ) -> None:
        """401, no row anywhere, one warning that does not quote the body."""
        await add_invoice(db, "5001")
        answer = status_answer("5001", "finished", T0, order_description="marker-in-body")

        with capture_logs() as logs:
            forged = await listener.send(answer, secret="not-the-secret")
            unsigned = await listener.post(json.dumps(ipn_body(answer)).encode(), None)

        assert (forged, unsigned) == (401, 401)
        assert await db.pool.fetchval("SELECT count(*) FROM nproxyd_invoice_payments") == 0
        assert await db.pool.fetchval("SELECT count(*) FROM nproxyd_invoice_payment_history") == 0
        warnings = [entry for entry in logs if entry["log_level"] == "warning"]
        assert [entry["event"] for entry in warnings] == ["ipn_rejected", "ipn_rejected"]
        assert "marker-in-body" not in repr(logs)
        assert listener.count("rejected") == 2

    async def test_a_notification_signed_the_javascript_way_is_accepted(
        self, db: Database, listener: Listener
    ) -> None:
        """A signature over JSON.stringify's form (0.00005, 1e-7, raw UTF-8) is accepted."""
        await add_invoice(db, "5001")
        raw = JS_BODY.encode("utf-8")
        body = json.loads(raw)

        status = await listener.post(raw, ipn_signature_js(body, SECRET))
        forged = await listener.post(raw, ipn_signature_js(body, "not-the-secret"))

        assert js_canonical(body) == JS_CANONICAL  # the stand-in signs what node would
        assert (status, forged) == (200, 401)
        assert await history(db, "5001") == [(None, "finished", "ipn")]
        row = await db.pool.fetchrow("SELECT * FROM nproxyd_invoice_payments")
        assert row is not None
        assert row["actually_paid"] == Decimal("1e-7")
        assert row["pay_amount"] == Decimal("0.00005")
        assert listener.count("ok") == 1 and listener.count("rejected") == 1

    async def test_a_signature_leaving_a_nested_object_unsigned_is_refused(
        self, db: Database, listener: Listener
    ) -> None:
        """Signed with "fee" written {} (node): 401; signed over every key, nested too: 200."""
        await add_invoice(db, "5001")
        raw = FEE_BODY.encode()

        partial = await listener.post(raw, FEE_TOP_LEVEL_ONLY_SIGNATURE)
        whole = await listener.post(raw, ipn_signature(json.loads(raw), SECRET))

        assert (partial, whole) == (401, 200)
        assert await history(db, "5001") == [(None, "finished", "ipn")]

    async def test_a_changed_value_inside_a_nested_object_breaks_the_signature(
        self, db: Database, listener: Listener
    ) -> None:
        """A genuine notification whose nested "fee" was altered afterwards is refused."""
        await add_invoice(db, "5001")
        body = json.loads(FEE_BODY)
        signature = ipn_signature(body, SECRET)
        body["fee"]["depositFee"] = 0

        status = await listener.post(json.dumps(body).encode(), signature)

        assert status == 401
        assert await history(db, "5001") == []

    async def test_replays_and_older_notifications_change_nothing(
        self, db: Database, listener: Listener
    ) -> None:
        """The same notification twice is one change; an older one never undoes a newer one."""
        await add_invoice(db, "5001")
        newer = status_answer("5001", "confirming", T0 + timedelta(minutes=10))
        older = status_answer("5001", "waiting", T0)

        answers = [await listener.send(newer), await listener.send(newer)]
        answers.append(await listener.send(older))

        assert answers == [200, 200, 200]
        assert await history(db, "5001") == [(None, "confirming", "ipn")]
        row = await db.pool.fetchrow("SELECT provider_status FROM nproxyd_invoice_payments")
        assert row is not None
        assert row["provider_status"] == "confirming"

    async def test_a_notification_dated_far_in_the_future_is_invalid_and_does_not_freeze(
        self, db: Database, listener: Listener
    ) -> None:
        """updated_at 9999-12-31: 200, counted invalid, nothing recorded; the next one is."""
        await add_invoice(db, "5001")
        future = {**status_answer("5001", "waiting", T0), "updated_at": FAR_FUTURE}

        with capture_logs() as logs:
            answers = [await listener.send(future)]
        answers.append(await listener.send(status_answer("5001", "confirming", T0)))

        assert answers == [200, 200]
        assert listener.count("invalid") == 1 and listener.count("ok") == 1
        assert any(e["event"] == "ipn_invalid" and "updated_at" in e["reason"] for e in logs)
        assert await history(db, "5001") == [(None, "confirming", "ipn")]

    async def test_an_unknown_payment_is_answered_200_and_logged(
        self, db: Database, listener: Listener
    ) -> None:
        """A notification for a payment nproxyd does not know: 200, logged, nothing stored."""
        with capture_logs() as logs:
            status = await listener.send(status_answer("999", "finished", T0))
        assert status == 200
        assert any(e["event"] == "ipn_unknown_payment" for e in logs)
        assert await db.pool.fetchval("SELECT count(*) FROM nproxyd_invoice_payments") == 0
        assert listener.count("unknown_payment") == 1

    async def test_an_amount_the_database_cannot_hold_is_invalid_not_retried(
        self, db: Database, listener: Listener
    ) -> None:
        """A signed amount numeric cannot hold: 200 and invalid, not a 503 the provider repeats."""
        await add_invoice(db, "5001")
        body = (
            b'{"payment_id": 5001, "payment_status": "finished", "actually_paid": 1e-20000,'
            b' "updated_at": "2026-03-10T12:00:00.000Z"}'
        )

        status = await listener.post(body, ipn_signature(json.loads(body), SECRET))

        assert status == 200
        assert listener.count("invalid") == 1 and listener.count("error") == 0
        assert await db.pool.fetchval("SELECT count(*) FROM nproxyd_invoice_payment_history") == 0

    async def test_bodies_over_64_kib_are_refused(self, db: Database, listener: Listener) -> None:
        """413 for a body over the limit, signed or not; nothing recorded."""
        await add_invoice(db, "5001")
        big = status_answer("5001", "finished", T0, padding="x" * MAX_BODY_BYTES)
        assert await listener.send(big) == 413
        assert await db.pool.fetchval("SELECT count(*) FROM nproxyd_invoice_payments") == 0
        assert listener.count("too_large") == 1


class BrokenSink:
    """A sink with a bug: every notification raises what no adapter classifies."""

    async def receive_ipn(self, body: bytes, signature: str | None) -> IpnOutcome:
        raise RuntimeError("a bug in the handler")


class TestHandlerBug:
    async def test_a_bug_is_answered_500_and_counted_as_an_error(self) -> None:
        """An unclassified exception: 500 (the provider retries), and the error counter moves,
        so a listener failing every notification is visible on /metrics."""
        server = IpnServer(BrokenSink(), "127.0.0.1:0", PaymentMetrics(Registry()))
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                listener = Listener(server, session)
                status = await listener.send(status_answer("5001", "finished", T0))
        finally:
            await server.stop()

        assert status == 500
        assert listener.count("error") == 1
