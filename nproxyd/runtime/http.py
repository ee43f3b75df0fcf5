"""The operations HTTP server: /livez, /readyz, /metrics, /status (aiohttp)."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from nproxyd.core.errors import ConfigError
from nproxyd.runtime.ops import OpsQueries


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("http.listen", f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        return web.json_response({"error": exc.reason}, status=exc.status)
    except Exception as exc:
        structlog.get_logger().error(
            "http_handler_failed", path=request.path, error_class=type(exc).__name__
        )
        return web.json_response({"error": "internal error"}, status=500)
    return response


class OpsServer:
    def __init__(self, state: OpsQueries, listen: str) -> None:
        self.state = state
        self.host, self.port = parse_listen(listen)
        self.runner: web.AppRunner | None = None
        self.log = structlog.get_logger()

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        return app

    async def start(self) -> None:
        """Bind the socket (so a bad address fails start-up, before READY)."""
        self.runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise ConfigError(
                "http.listen", f"cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        addresses = self.runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        self.log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def livez(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readyz(self, _: web.Request) -> web.Response:
        ready, body = await self.state.readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, _: web.Request) -> web.Response:
        body = await self.state.metrics_text()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response(await self.state.status())
