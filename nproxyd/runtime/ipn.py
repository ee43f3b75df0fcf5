"""The IPN listener: ``POST /ipn/nowpayments`` on an address of its own (``ipn.listen``).

It is meant to sit behind a reverse proxy, apart from the operations port. It only moves
bytes: the sink (the payment watcher) verifies the signature and records the notification.
"""

from __future__ import annotations

from typing import Any

import structlog

from nproxyd.core.errors import NproxydError
from nproxyd.core.ports import IpnSink
from nproxyd.runtime.http import Request, Response, Site, error_response, json_response
from nproxyd.runtime.payment_metrics import PaymentMetrics

MAX_BODY_BYTES = 64 * 1024
SIGNATURE_HEADER = "x-nowpayments-sig"
_STATUS = {"rejected": 401}


class IpnServer:
    def __init__(self, sink: IpnSink, listen: str, metrics: PaymentMetrics) -> None:
        self.site = Site(
            listen, "ipn.listen", max_body=MAX_BODY_BYTES, on_too_large=self._too_large
        )
        self.site.route("POST", "/ipn/nowpayments", self.nowpayments)
        self.sink = sink
        self.metrics = metrics
        self.log = structlog.get_logger()

    @property
    def port(self) -> int:
        return self.site.port

    async def start(self) -> None:
        """Bind the socket before the daemon reports ready."""
        await self.site.start()
        self.log.info("ipn_listening", host=self.site.host, port=self.site.port)

    async def stop(self) -> None:
        await self.site.stop()

    async def nowpayments(self, request: Request) -> Response:
        try:
            signature = request.headers.get(SIGNATURE_HEADER)
            outcome = await self.sink.receive_ipn(request.body, signature)
        except NproxydError as exc:
            # The provider retries a notification that was not answered 2xx.
            self.metrics.count_ipn("error")
            self.log.warning("ipn_failed", error_class=type(exc).__name__, error=exc.message)
            return error_response(503, "try again later")
        except Exception:  # a bug: the server answers 500 and logs its class; counted here
            self.metrics.count_ipn("error")
            raise
        self.metrics.count_ipn(outcome)
        status = _STATUS.get(outcome.outcome, 200)
        body_out: dict[str, Any] = {"status": "refused" if status == 401 else "ok"}
        return json_response(body_out, status=status)

    def _too_large(self, size: int) -> Response:
        """A body over the limit: the server answers this without reading the body."""
        self.metrics.count_ipn("too_large")
        self.log.warning("ipn_too_large", content_length=size, limit_bytes=MAX_BODY_BYTES)
        return error_response(413, "body too large")
