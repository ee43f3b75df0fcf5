"""What the operations surface reports: readiness, status and metrics of a running daemon."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec

from nproxyd.core.channels import Channel
from nproxyd.core.clock import Clock, format_instant
from nproxyd.core.errors import NproxydError
from nproxyd.core.ports import PaymentWatchStore
from nproxyd.runtime.actor import ActorLoop, TickOutcome
from nproxyd.runtime.metrics import Metrics
from nproxyd.runtime.supervisor import Supervisor
from nproxyd.store.stores import HealthStore, KeyStore, OutboxStore

READY_INTERVALS = 3
DB_TIMEOUT_SECONDS = 2.0


class Monitor:
    """Watches tick outcomes: feeds the metrics and remembers each actor's last success."""

    def __init__(self, clock: Clock, metrics: Metrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self.last_success: dict[str, float] = {}

    def tick_started(self, actor: str) -> None:
        """Nothing to record when a tick starts."""

    def tick_finished(self, outcome: TickOutcome) -> None:
        self.metrics.tick_finished(outcome, self.clock.now().timestamp())
        if outcome.ok:
            self.last_success[outcome.actor] = self.clock.monotonic()


class OpsState:
    """Collects what /readyz, /status and /metrics answer."""

    def __init__(
        self,
        *,
        clock: Clock,
        instance_id: str,
        loops: dict[str, ActorLoop],
        supervisor: Supervisor,
        monitor: Monitor,
        health: HealthStore,
        outbox: OutboxStore,
        keys: KeyStore,
        channel: Channel[Any],
        payments: PaymentWatchStore | None = None,
    ) -> None:
        self.payments = payments
        self.clock = clock
        self.instance_id = instance_id
        self.loops = loops
        self.supervisor = supervisor
        self.monitor = monitor
        self.health = health
        self.outbox = outbox
        self.keys = keys
        self.channel = channel
        self.started = clock.monotonic()

    async def database_ok(self) -> bool:
        with anyio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                return await self.health.ping()
            except NproxydError:
                return False
        return False

    def actor_ready(self, name: str) -> dict[str, Any]:
        loop = self.loops[name]
        last = self.monitor.last_success.get(name)
        age = None if last is None else self.clock.monotonic() - last
        ok = age is not None and age <= READY_INTERVALS * loop.stats.interval_seconds
        return {"ok": ok, "seconds_since_success": None if age is None else round(age, 3)}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        database = await self.database_ok()
        actors = {name: self.actor_ready(name) for name in self.loops}
        ready = database and self.supervisor.healthy and all(a["ok"] for a in actors.values())
        self.monitor.metrics.ready.set(1 if ready else 0)
        return ready, {"ready": ready, "database": database, "actors": actors}

    async def refresh_gauges(self) -> dict[str, Any]:
        """Read outbox and key-pool counts into the gauges; stale values stay on failure."""
        metrics = self.monitor.metrics
        metrics.queue_depth.set(self.channel.depth)
        counts: dict[str, Any] = {"outbox": None, "provider_keys": None}
        with anyio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                outbox = await self.outbox.counts()
                keys = await self.keys.counts()
            except NproxydError:
                return counts
            metrics.outbox_pending.set(outbox.pending)
            metrics.set_key_counts(keys)
            counts = {"outbox": msgspec.to_builtins(outbox), "provider_keys": keys}
        counts["payments"] = await self.refresh_payments()
        return counts

    async def refresh_payments(self) -> dict[str, Any] | None:
        """Invoices awaiting activation, into the gauges and /status; None when unknown."""
        if self.payments is None:
            return None
        with anyio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                summary = await self.payments.awaiting_summary(self.clock.now())
            except NproxydError:
                return None
            self.monitor.metrics.payments.set_awaiting(summary)
            return {
                "awaiting_activation": summary.count,
                "oldest_wait_seconds": round(summary.oldest_seconds, 3),
            }
        return None

    async def metrics_text(self) -> bytes:
        await self.refresh_gauges()
        await self.readiness()
        return self.monitor.metrics.render()

    async def status(self) -> dict[str, Any]:
        counts = await self.refresh_gauges()
        ready, readiness = await self.readiness()
        return {
            "instance": self.instance_id,
            "uptime_seconds": round(self.clock.monotonic() - self.started, 3),
            "ready": ready,
            "database": readiness["database"],
            "supervisor_healthy": self.supervisor.healthy,
            "actors": {name: self._actor_status(name) for name in self.loops},
            "queue_depth": self.channel.depth,
            "messages_dropped": self.channel.dropped,
            **counts,
        }

    def _actor_status(self, name: str) -> dict[str, Any]:
        stats = self.loops[name].stats
        outcome = stats.last_outcome
        return {
            "interval_seconds": stats.interval_seconds,
            "running": stats.running,
            "ticks": stats.ticks_run,
            "ticks_failed": stats.ticks_failed,
            "consecutive_failures": stats.consecutive_failures,
            "restarts": self.supervisor.restarts.get(name, 0),
            "last_tick_at": _instant(stats.last_started_at),
            "last_outcome": None if outcome is None else ("ok" if outcome.ok else "error"),
            "last_error": None if outcome is None else outcome.error_message,
            "last_duration_seconds": None
            if outcome is None
            else round(outcome.duration_seconds, 6),
            "next_due_at": _instant(stats.next_due_at),
            "ready": self.actor_ready(name)["ok"],
        }


def _instant(value: Any) -> str | None:
    return None if value is None else format_instant(value)
