"""The running daemon: supervised actor loops, the HTTP surface, signals and sd_notify."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc
import structlog

from nproxyd.core.channels import Channel
from nproxyd.core.clock import Clock
from nproxyd.core.config import Config
from nproxyd.core.errors import SupervisorGaveUp
from nproxyd.core.ports import IpnSink, PaymentWatchStore
from nproxyd.runtime.actor import Actor, ActorLoop
from nproxyd.runtime.http import OpsServer
from nproxyd.runtime.ipn import IpnServer
from nproxyd.runtime.metrics import Metrics
from nproxyd.runtime.ops import Monitor, OpsState
from nproxyd.runtime.sdnotify import Notifier, watchdog_interval_seconds
from nproxyd.runtime.supervisor import Supervisor
from nproxyd.store.stores import HealthStore, KeyStore, OutboxStore


class Daemon:
    def __init__(
        self,
        *,
        config: Config,
        clock: Clock,
        instance_id: str,
        actors: Mapping[str, Actor],
        wake: Mapping[str, anyio.abc.ObjectReceiveStream[Any]],
        health: HealthStore,
        outbox: OutboxStore,
        keys: KeyStore,
        channel: Channel[Any],
        environ: Mapping[str, str] | None = None,
        payments: PaymentWatchStore | None = None,
        ipn: IpnSink | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self.log = structlog.get_logger()
        self.shutdown = anyio.Event()
        self.metrics = Metrics(list(actors))
        self.monitor = Monitor(clock, self.metrics)
        self.loops = {
            name: ActorLoop(actor, clock, self.monitor, wake=wake.get(name))
            for name, actor in actors.items()
        }
        self.supervisor = Supervisor(
            clock,
            max_restarts=config.daemon.max_restarts,
            restart_window_seconds=config.daemon.restart_window_seconds,
            on_restart=lambda name: self.metrics.restarts.labels(actor=name).inc(),
        )
        for name, loop in self.loops.items():
            self.supervisor.add(name, loop.run)
        self.state = OpsState(
            clock=clock,
            instance_id=instance_id,
            loops=self.loops,
            supervisor=self.supervisor,
            monitor=self.monitor,
            health=health,
            outbox=outbox,
            keys=keys,
            channel=channel,
            payments=payments,
        )
        self.server = OpsServer(self.state, config.http.listen)
        self.ipn_server = (
            IpnServer(ipn, config.ipn.listen, self.metrics.payments)
            if ipn is not None and config.ipn.listen
            else None
        )
        self.notifier = Notifier.from_environ(self.environ)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; raises SupervisorGaveUp when the actors keep crashing."""
        await self.server.start()
        gave_up: SupervisorGaveUp | None = None
        try:
            if self.ipn_server is not None:
                await self.ipn_server.start()
            async with anyio.create_task_group() as group:
                group.start_soon(self._signals, group.cancel_scope, name="signals")
                group.start_soon(self._watchdog, name="sd-watchdog")
                group.start_soon(self._grace, group.cancel_scope, name="shutdown-grace")
                self.log.info(
                    "daemon_started", actors=sorted(self.loops), http_port=self.server.port
                )
                self.notifier.ready(f"running {len(self.loops)} actors")
                try:
                    await self.supervisor.run(self.shutdown)
                except SupervisorGaveUp as exc:
                    gave_up = exc
                group.cancel_scope.cancel()
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

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self.shutdown.is_set():
                    self.log.warning("shutdown_forced", signal=signal.Signals(signum).name)
                    scope.cancel()
                    return
                self.log.info("shutdown_requested", signal=signal.Signals(signum).name)
                self.notifier.stopping("stopping: finishing running ticks")
                self.shutdown.set()

    async def _grace(self, scope: anyio.CancelScope) -> None:
        await self.shutdown.wait()
        await self.clock.sleep(self.config.daemon.shutdown_grace_seconds)
        self.log.warning(
            "shutdown_grace_exceeded", grace_seconds=self.config.daemon.shutdown_grace_seconds
        )
        scope.cancel()

    async def _watchdog(self) -> None:
        interval = watchdog_interval_seconds(self.environ)
        if interval is None or not self.notifier.enabled:
            return
        while not self.shutdown.is_set():
            if self.supervisor.healthy:
                ready, _ = await self.state.readiness()
                self.notifier.send("WATCHDOG=1", f"STATUS={self._summary(ready)}")
            await self.clock.sleep(interval)

    def _summary(self, ready: bool) -> str:
        failing = sorted(n for n, loop in self.loops.items() if loop.stats.consecutive_failures)
        state = "ready" if ready else "not ready"
        return f"{state}; {len(self.loops)} actors" + (
            f"; failing: {', '.join(failing)}" if failing else ""
        )
