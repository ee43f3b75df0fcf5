"""The operations HTTP server: /livez, /readyz, /metrics, /status (aiohttp)."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from nproxyd.core.errors import ConfigError
from nproxyd.runtime.ops import OpsQueries


def parse_listen(listen: str, key: str = "http.listen") -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


class Site:
    """An aiohttp application on ``HOST:PORT``; ``key`` names the setting in errors.

    ``start`` binds the socket, so a bad or busy address fails start-up before READY; the
    ``OSError`` stays the error's cause (a busy port is a temporary failure, exit 75).
    """

    def __init__(self, listen: str, key: str) -> None:
        self.key = key
        self.host, self.port = parse_listen(listen, key)
        self.runner: web.AppRunner | None = None

    async def start(self, application: web.Application) -> None:
        self.runner = web.AppRunner(application, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise ConfigError(
                self.key, f"cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        if self.runner.addresses:
            self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


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
        self.site = Site(listen, "http.listen")
        self.log = structlog.get_logger()

    @property
    def port(self) -> int:
        return self.site.port

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        return app

    async def start(self) -> None:
        """Bind the socket (so a bad address fails start-up, before READY)."""
        await self.site.start(self.application())
        self.log.info("http_listening", host=self.site.host, port=self.site.port)

    async def stop(self) -> None:
        await self.site.stop()

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
