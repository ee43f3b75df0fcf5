"""The IPN listener: ``POST /ipn/nowpayments`` on an address of its own (``ipn.listen``).

It is meant to sit behind a reverse proxy, apart from the operations port. It only moves
bytes: the sink (the payment watcher) verifies the signature and records the notification.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from nproxyd.core.errors import NproxydError
from nproxyd.core.ports import IpnSink
from nproxyd.runtime.http import Site
from nproxyd.runtime.payment_metrics import PaymentMetrics

MAX_BODY_BYTES = 64 * 1024
SIGNATURE_HEADER = "x-nowpayments-sig"
_STATUS = {"rejected": 401}


class IpnServer:
    def __init__(self, sink: IpnSink, listen: str, metrics: PaymentMetrics) -> None:
        self.site = Site(listen, "ipn.listen")
        self.sink = sink
        self.metrics = metrics
        self.log = structlog.get_logger()

    @property
    def port(self) -> int:
        return self.site.port

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/ipn/nowpayments", self.nowpayments)
        return app

    async def start(self) -> None:
        """Bind the socket before the daemon reports ready."""
        await self.site.start(self.application())
        self.log.info("ipn_listening", host=self.site.host, port=self.site.port)

    async def stop(self) -> None:
        await self.site.stop()

    async def nowpayments(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return self._too_large(request.content_length)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        try:
            outcome = await self.sink.receive_ipn(body, request.headers.get(SIGNATURE_HEADER))
        except NproxydError as exc:
            # The provider retries a notification that was not answered 2xx.
            self.metrics.count_ipn("error")
            self.log.warning("ipn_failed", error_class=type(exc).__name__, error=exc.message)
            return web.json_response({"error": "try again later"}, status=503)
        self.metrics.count_ipn(outcome)
        status = _STATUS.get(outcome.outcome, 200)
        body_out: dict[str, Any] = {"status": "refused" if status == 401 else "ok"}
        return web.json_response(body_out, status=status)

    def _too_large(self, size: int | None) -> web.Response:
        self.metrics.count_ipn("too_large")
        self.log.warning("ipn_too_large", content_length=size, limit_bytes=MAX_BODY_BYTES)
        return web.json_response({"error": "body too large"}, status=413)
