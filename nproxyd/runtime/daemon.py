"""The running daemon: supervised actor loops, the HTTP surface, signals and sd_notify."""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec
import structlog

from nproxyd import __version__
from nproxyd.core.clock import Clock
from nproxyd.core.errors import ConfigError, PortBusy, SupervisorGaveUp
from nproxyd.runtime.actor import ActorLoop
from nproxyd.runtime.http import OpsServer
from nproxyd.runtime.ipn import IpnServer
from nproxyd.runtime.metrics import Metrics
from nproxyd.runtime.ops import HEALTH_CHECK_SECONDS, OpsQueries
from nproxyd.runtime.sdnotify import Notifier, watchdog_interval_seconds
from nproxyd.runtime.supervisor import Supervisor

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Signals an operator or a log rotator may send that must never stop the daemon: each is
# logged (`signal_received`) and otherwise ignored; nproxyd reads its configuration only at
# start (docs/operations.md "Signals").
NOTED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def ignore_noted_signals() -> None:
    """Ignore :data:`NOTED_SIGNALS` outside the daemon's signal task (start-up, shutdown)."""
    if threading.current_thread() is threading.main_thread():
        for signum in NOTED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _port_busy(exc: ConfigError) -> PortBusy | None:
    """A busy HTTP port is a temporary failure (exit 75), not a configuration error."""
    cause = exc.__cause__ or exc.__context__
    listening = exc.key in ("http.listen", "ipn.listen")
    if listening and isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return PortBusy(f"{exc.key}: {exc.reason}")
    return None


async def _start(server: OpsServer | IpnServer) -> None:
    """Bind ``server``'s socket; a busy port is a temporary failure (exit 75)."""
    try:
        await server.start()
    except ConfigError as exc:
        raise _port_busy(exc) or exc from None


class DaemonParts(msgspec.Struct, frozen=True, kw_only=True):
    """What a daemon runs, built by the composition root (``nproxyd.app.build_daemon``)."""

    instance_id: str
    metrics: Metrics
    loops: Mapping[str, ActorLoop]
    supervisor: Supervisor  # every loop and the listener already added
    queries: OpsQueries
    server: OpsServer
    notifier: Notifier
    ipn_server: IpnServer | None = None
    shutdown_grace_seconds: float
    environ: Mapping[str, str]
    startup: Mapping[str, Any] = msgspec.field(default_factory=dict)


class Daemon:
    def __init__(self, parts: DaemonParts, *, clock: Clock) -> None:
        self.parts = parts
        self.clock = clock
        self.instance_id = parts.instance_id
        self.metrics = parts.metrics
        self.loops = parts.loops
        self.supervisor = parts.supervisor
        self.queries = parts.queries
        self.server = parts.server
        self.ipn_server = parts.ipn_server
        self.notifier = parts.notifier
        self.environ = parts.environ
        self.startup = dict(parts.startup)
        self.log = structlog.get_logger()
        self.shutdown = anyio.Event()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; raises SupervisorGaveUp when the actors keep crashing."""
        await _start(self.server)
        try:
            if self.ipn_server is not None:
                await _start(self.ipn_server)
            gave_up = await self._supervise()
        finally:
            self.notifier.stopping("stopping")
            with anyio.CancelScope(shield=True):
                if self.ipn_server is not None:
                    await self.ipn_server.stop()
                await self.server.stop()
            self.log.info("daemon_stopped")
        if gave_up is not None:
            raise gave_up
        return 0

    async def _supervise(self) -> SupervisorGaveUp | None:
        """Run the supervisor with the daemon's own tasks beside it, until it returns."""
        gave_up: SupervisorGaveUp | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._signals, group.cancel_scope, name="signals")
            group.start_soon(self._watchdog, name="sd-watchdog")
            group.start_soon(self._grace, group.cancel_scope, name="shutdown-grace")
            group.start_soon(self._health, name="health-check")
            self.log.info(
                "daemon_started",
                version=__version__,
                instance_id=self.instance_id,
                actors=sorted(self.loops),
                http_port=self.server.port,
                **self.startup,
            )
            self.notifier.ready(f"running {len(self.loops)} actors")
            try:
                await self.supervisor.run(self.shutdown)
            except SupervisorGaveUp as exc:
                gave_up = exc
            group.cancel_scope.cancel()
        return gave_up

    async def _signals(self, scope: anyio.CancelScope) -> None:
        try:
            with anyio.open_signal_receiver(*STOP_SIGNALS, *NOTED_SIGNALS) as signals:
                async for signum in signals:
                    if signum in NOTED_SIGNALS:
                        self.log.info(
                            "signal_received", signal=signal.Signals(signum).name, action="none"
                        )
                        continue
                    if self._stop(signum, scope):
                        return
        finally:
            ignore_noted_signals()

    def _stop(self, signum: int, scope: anyio.CancelScope) -> bool:
        """Handle SIGTERM/SIGINT; True when the second one forced an immediate stop."""
        if self.shutdown.is_set():
            self.log.warning("shutdown_forced", signal=signal.Signals(signum).name)
            scope.cancel()
            return True
        self.log.info("shutdown_requested", signal=signal.Signals(signum).name)
        self.notifier.stopping("stopping: finishing running ticks")
        self.shutdown.set()
        return False

    async def _grace(self, scope: anyio.CancelScope) -> None:
        await self.shutdown.wait()
        await self.clock.sleep(self.parts.shutdown_grace_seconds)
        self.log.warning("shutdown_grace_exceeded", grace_seconds=self.parts.shutdown_grace_seconds)
        scope.cancel()

    async def _health(self) -> None:
        """Judge readiness on the daemon's own schedule, so ``nproxyd_ready`` is always current."""
        while not self.shutdown.is_set():
            await self.queries.check()
            await self.clock.sleep(HEALTH_CHECK_SECONDS)

    async def _watchdog(self) -> None:
        interval = watchdog_interval_seconds(self.environ)
        if interval is None or not self.notifier.enabled:
            return
        while not self.shutdown.is_set():
            if self.supervisor.healthy:
                ready, body = await self.queries.readiness()
                reasons = sorted({reason["reason"] for reason in body["reasons"]})
                self.notifier.watchdog(self._summary(ready, reasons))
            await self.clock.sleep(interval)

    def _summary(self, ready: bool, reasons: list[str] | None = None) -> str:
        failing = sorted(n for n, loop in self.loops.items() if loop.stats.consecutive_failures)
        state = "ready" if ready else f"not ready ({', '.join(reasons or [])})"
        return f"{state}; {len(self.loops)} actors" + (
            f"; failing: {', '.join(failing)}" if failing else ""
        )
