"""What the operations surface reports: readiness, status and metrics of a running daemon.

Readiness is judged by :meth:`OpsQueries.check`, which the daemon runs on its own every
:data:`HEALTH_CHECK_SECONDS` (and each request runs afresh, or shares the check already
running). The reasons it can give are documented in docs/operations.md ("Readiness reasons").
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
import msgspec
import structlog

from nproxyd.actors.mail_sender import MailSender
from nproxyd.actors.payment_watcher import PaymentWatcher
from nproxyd.actors.renewal_scheduler import RenewalScheduler
from nproxyd.core.channels import Channel
from nproxyd.core.clock import Clock, format_instant
from nproxyd.core.config import HealthConfig
from nproxyd.core.errors import NproxydError
from nproxyd.core.ports import HealthReadStore, KeyCountStore, PaymentWatchStore
from nproxyd.core.records import HealthGauges
from nproxyd.runtime.actor import ActorLoop, TickOutcome
from nproxyd.runtime.listener import MailDueListener
from nproxyd.runtime.metrics import DatabaseSnapshot, Metrics
from nproxyd.runtime.supervisor import Supervisor

READY_INTERVALS = 3
DB_TIMEOUT_SECONDS = 2.0
HEALTH_CHECK_SECONDS = 10.0
# Which actor's degraded streak means what, and the health key bounding it.
DEGRADED_REASONS = {
    RenewalScheduler.name: ("provider_failing", "provider_failing_seconds"),
    MailSender.name: ("mail_failing", "mail_failing_seconds"),
    PaymentWatcher.name: ("provider_failing", "provider_failing_seconds"),
}


class ActorHealth(msgspec.Struct, kw_only=True):
    """What the monitor knows of one actor's ticks (monotonic seconds)."""

    last_returned: float | None = None  # last tick that returned (ok or degraded)
    last_ok: float | None = None
    running_since: float | None = None
    degraded_since: float | None = None  # first degraded tick of the current streak
    last_degraded: float | None = None
    last_degraded_reason: str | None = None


class Monitor:
    """Watches tick outcomes: feeds the metrics and remembers what readiness needs."""

    def __init__(self, clock: Clock, metrics: Metrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self.actors: dict[str, ActorHealth] = {}

    def health(self, actor: str) -> ActorHealth:
        return self.actors.setdefault(actor, ActorHealth())

    def tick_started(self, actor: str) -> None:
        self.health(actor).running_since = self.clock.monotonic()

    def tick_finished(self, outcome: TickOutcome) -> None:
        self.metrics.tick_finished(outcome, self.clock.now().timestamp())
        now = self.clock.monotonic()
        health = self.health(outcome.actor)
        health.running_since = None
        if not outcome.ok:
            return
        health.last_returned = now
        if outcome.degraded is not None:
            if health.degraded_since is None:
                health.degraded_since = now
            health.last_degraded = now
            health.last_degraded_reason = outcome.degraded
            return
        health.last_ok = now
        if outcome.report is None or not outcome.report.idle():
            health.degraded_since = None


class Reason(msgspec.Struct, frozen=True, kw_only=True):
    """Why the daemon is not ready: a stable code and a sentence for the operator."""

    reason: str
    detail: str
    actor: str | None = None


class _SharedCheck:
    """A readiness check in flight; calls that arrive meanwhile wait for its result."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: tuple[bool, dict[str, Any]] | None = None  # None: it did not finish


class OpsQueries:
    """Collects what /readyz, /status and /metrics answer."""

    def __init__(
        self,
        *,
        clock: Clock,
        instance_id: str,
        loops: dict[str, ActorLoop],
        supervisor: Supervisor,
        monitor: Monitor,
        health: HealthReadStore,
        keys: KeyCountStore,
        channel: Channel[Any],
        settings: HealthConfig | None = None,
        retry_windows: dict[str, float] | None = None,
        listener: MailDueListener | None = None,
        payments: PaymentWatchStore | None = None,
    ) -> None:
        self.payments = payments
        self.clock = clock
        self.instance_id = instance_id
        self.loops = loops
        self.supervisor = supervisor
        self.monitor = monitor
        self.health = health
        self.keys = keys
        self.channel = channel
        self.settings = settings or HealthConfig()
        # Per actor: the longest a failed work item waits for its retry, plus one interval.
        self.retry_windows = retry_windows or {}
        self.listener = listener
        self.started = clock.monotonic()
        self.snapshot: DatabaseSnapshot | None = None
        self.awaiting: dict[str, Any] | None = None
        self.was_ready: bool | None = None
        self._checking: _SharedCheck | None = None
        self.log = structlog.get_logger()

    async def read_database(self) -> DatabaseSnapshot | None:
        """The database-backed gauges now, or ``None`` when the database does not answer."""
        with anyio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                gauges = await self.health.gauges(self.clock.now())
                keys = await self.keys.counts()
            except NproxydError:
                return None
            except Exception as exc:
                # The driver can raise what the store does not classify (asyncpg's
                # InternalClientError while the server terminates connections); a health check
                # reports the database as unreadable instead of failing the request or daemon.
                self.log.warning("health_check_unclassified_error", error_class=type(exc).__name__)
                return None
            return _snapshot(gauges, keys, self.clock.now())
        return None

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Read the database, refresh the gauges and judge readiness (sets ``nproxyd_ready``).

        A call while another runs gets that one's answer instead of reading the database again:
        a burst of requests takes one pool connection, not one each from the actors' pool.
        """
        while (running := self._checking) is not None:
            await running.done.wait()
            if running.result is not None:
                return running.result
        running = self._checking = _SharedCheck()
        try:
            running.result = await self._check()
            return running.result
        finally:
            self._checking = None
            running.done.set()

    async def _check(self) -> tuple[bool, dict[str, Any]]:
        metrics = self.monitor.metrics
        metrics.queue_depth.set(self.channel.depth)
        self.count_wakeups()
        self.snapshot = await self.read_database()
        metrics.database_read(self.snapshot)
        self.awaiting = await self.refresh_payments()
        reasons = self.reasons()
        ready = not reasons
        metrics.ready.set(1 if ready else 0)
        self._log_change(ready, reasons)
        body = {
            "ready": ready,
            "database": self.snapshot is not None,
            "reasons": [msgspec.to_builtins(reason) for reason in reasons],
            "actors": {name: self.actor_ready(name) for name in self.loops},
        }
        return ready, body

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        return await self.check()

    async def refresh_payments(self) -> dict[str, Any] | None:
        """Invoices awaiting activation, into the gauges and /status; None when unknown.

        Like the other database-backed gauges, the awaiting gauges are left out of /metrics
        while they cannot be read, never stale.
        """
        if self.payments is None:
            return None
        metrics = self.monitor.metrics.payments
        with anyio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                summary = await self.payments.awaiting_summary(self.clock.now())
            except NproxydError:
                metrics.forget_awaiting()
                return None
            metrics.set_awaiting(summary)
            return {
                "awaiting_activation": summary.count,
                "oldest_wait_seconds": round(summary.oldest_seconds, 3),
            }
        metrics.forget_awaiting()
        return None

    def count_wakeups(self) -> None:
        """Mail-sender wake-ups kept as counts elsewhere: in-process messages and sweeps."""
        metrics = self.monitor.metrics
        metrics.count_wakeups("local", self.channel.sent)
        mail = self.loops.get(MailSender.name)
        if mail is not None:
            metrics.count_wakeups("sweep", mail.stats.timer_ticks)

    def reasons(self) -> list[Reason]:
        found: list[Reason] = []
        if self.snapshot is None:
            found.append(
                Reason(reason="database_unreachable", detail="the database does not answer")
            )
        if not self.supervisor.healthy:
            found.append(
                Reason(reason="supervisor_gave_up", detail="actors kept crashing; shutting down")
            )
        for name in self.loops:
            verdict = self.actor_ready(name)
            if not verdict["ok"]:
                found.append(Reason(reason="actor_stalled", detail=verdict["reason"], actor=name))
        found.extend(self._outbox_reasons())
        found.extend(self._degraded_reasons())
        return found

    def actor_ready(self, name: str) -> dict[str, Any]:
        """Whether one actor is doing its job: a recent tick returned, or one is running on time."""
        loop = self.loops[name]
        health = self.monitor.health(name)
        now = self.clock.monotonic()
        limit = READY_INTERVALS * loop.stats.interval_seconds
        since_tick = None if health.last_returned is None else now - health.last_returned
        running = None if health.running_since is None else now - health.running_since
        ok = since_tick is not None and since_tick <= limit
        if not ok and running is not None:
            ok = self._running_on_time(health, loop, running, limit)
        return {
            "ok": ok,
            "seconds_since_success": _age(now, health.last_ok),
            "seconds_since_tick": _rounded(since_tick),
            "tick_running_seconds": _rounded(running),
            "reason": None if ok else self._stall_detail(loop, since_tick, running, limit),
        }

    def _running_on_time(
        self, health: ActorHealth, loop: ActorLoop, running: float, limit: float
    ) -> bool:
        """A running tick is progress if the actor was healthy when it began and it is not hung."""
        # The first tick since start must finish: until then nothing proves the actor works.
        if loop.stats.consecutive_failures or health.running_since is None:
            return False
        if health.last_returned is None:
            return False
        started_on_time = health.running_since - health.last_returned <= limit
        return started_on_time and running <= max(limit, self.settings.max_tick_seconds)

    def _stall_detail(
        self, loop: ActorLoop, since_tick: float | None, running: float | None, limit: float
    ) -> str:
        if loop.stats.consecutive_failures:
            return f"its last {loop.stats.consecutive_failures} tick(s) failed"
        if since_tick is None:
            return "no tick has finished yet"
        if running is not None:
            bound = max(limit, self.settings.max_tick_seconds)
            return f"a tick has been running for {running:.0f} s (limit {bound:.0f} s)"
        return f"no tick finished for {since_tick:.0f} s (limit {limit:.0f} s)"

    def _outbox_reasons(self) -> list[Reason]:
        if self.snapshot is None:
            return []
        age = self.snapshot.oldest_pending_age_seconds
        limit = self.settings.outbox_stuck_seconds
        if age <= limit:
            return []
        detail = f"the oldest due pending mail has waited {age:.0f} s (limit {limit:.0f} s)"
        return [Reason(reason="outbox_stuck", detail=detail)]

    def _degraded_reasons(self) -> list[Reason]:
        found = []
        now = self.clock.monotonic()
        for name, (code, key) in DEGRADED_REASONS.items():
            health = self.monitor.actors.get(name)
            if name not in self.loops or health is None or health.degraded_since is None:
                continue
            limit = float(getattr(self.settings, key))
            lasted = now - health.degraded_since
            last = health.last_degraded if health.last_degraded is not None else now
            # Failed work is retried within its retry cap; no degraded tick for longer than
            # that means there is no work left to fail, so the streak no longer counts.
            fresh = max(limit, self.retry_windows.get(name, 0.0))
            if lasted >= limit and now - last <= fresh:
                detail = (
                    f"every work item of its ticks has failed for {lasted:.0f} s "
                    f"(limit {limit:.0f} s): {health.last_degraded_reason}"
                )
                found.append(Reason(reason=code, detail=detail, actor=name))
        return found

    def _log_change(self, ready: bool, reasons: list[Reason]) -> None:
        if ready == self.was_ready:
            return
        first = self.was_ready is None
        self.was_ready = ready
        if ready and not first:
            self.log.info("daemon_ready")
        elif not ready and not first:
            self.log.warning("daemon_not_ready", reasons=[reason.reason for reason in reasons])

    async def metrics_text(self) -> bytes:
        await self.check()
        return self.monitor.metrics.render()

    async def status(self) -> dict[str, Any]:
        ready, readiness = await self.check()
        failures = await self._latest_failures()
        snapshot = self.snapshot
        return {
            "instance": self.instance_id,
            "uptime_seconds": round(self.clock.monotonic() - self.started, 3),
            "ready": ready,
            "reasons": readiness["reasons"],
            "database": readiness["database"],
            "supervisor_healthy": self.supervisor.healthy,
            "actors": {name: self._actor_status(name, failures) for name in self.loops},
            "queue_depth": self.channel.depth,
            "messages_dropped": self.channel.dropped,
            "listener": None if self.listener is None else self.listener.status(),
            "outbox": None if snapshot is None else _outbox_status(snapshot),
            "provider_keys": None if snapshot is None else snapshot.provider_keys,
            "renewal_claims": None if snapshot is None else snapshot.renewal_claims,
            "payments": self.awaiting,
        }

    async def _latest_failures(self) -> dict[str, str | None]:
        """The newest stored error per actor that records one (empty if unreadable)."""
        if self.snapshot is None:
            return {}
        with anyio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                latest = await self.health.latest_failures()
            except Exception:  # /status shows what it can; see read_database
                return {}
            return {
                RenewalScheduler.name: latest.renewal_error,
                MailSender.name: latest.mail_error,
            }
        return {}

    def _actor_status(self, name: str, failures: dict[str, str | None]) -> dict[str, Any]:
        stats = self.loops[name].stats
        outcome = stats.last_outcome
        health = self.monitor.health(name)
        now = self.clock.monotonic()
        return {
            "interval_seconds": stats.interval_seconds,
            "running": stats.running,
            "ticks": stats.ticks_run,
            "ticks_failed": stats.ticks_failed,
            "ticks_degraded": stats.ticks_degraded,
            "consecutive_failures": stats.consecutive_failures,
            "degraded_for_seconds": _age(now, health.degraded_since),
            "restarts": self.supervisor.restarts.get(name, 0),
            "last_tick_at": _instant(stats.last_started_at),
            "last_outcome": None if outcome is None else outcome.outcome,
            "last_error": None if outcome is None else _last_error(outcome),
            "last_item_error": failures.get(name),
            "last_duration_seconds": None
            if outcome is None
            else round(outcome.duration_seconds, 6),
            "next_due_at": _instant(stats.next_due_at),
            "ready": self.actor_ready(name)["ok"],
        }


def _snapshot(gauges: HealthGauges, keys: dict[str, int], now: datetime) -> DatabaseSnapshot:
    oldest = gauges.oldest_due_at
    age = 0.0 if oldest is None else max((now - oldest).total_seconds(), 0.0)
    return DatabaseSnapshot(
        outbox_pending=gauges.outbox_pending,
        mail_dead=gauges.mail_dead,
        oldest_pending_age_seconds=round(age, 3),
        renewal_claims={
            "claimed": gauges.claims_claimed,
            "retry": gauges.claims_retry,
            "failed": gauges.claims_failed,
        },
        provider_keys=keys,
    )


def _outbox_status(snapshot: DatabaseSnapshot) -> dict[str, Any]:
    return {
        "pending": snapshot.outbox_pending,
        "dead": snapshot.mail_dead,
        "oldest_pending_age_seconds": snapshot.oldest_pending_age_seconds,
    }


def _last_error(outcome: TickOutcome) -> str | None:
    if outcome.error_message is not None:
        return f"{outcome.error_class}: {outcome.error_message}"
    return outcome.degraded


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _instant(value: Any) -> str | None:
    return None if value is None else format_instant(value)
