"""NOTIFY wake-ups: a supervised task that turns ``nproxyd_mail_due`` into mail-sender ticks.

Mail committed by anyone (the web API, another instance, ``nproxyd mail retry``) fires a
NOTIFY (migrations 0005 and 0007). This task keeps one LISTEN session open, wakes the mail
sender through its coalescing wake channel for each notification, and once more after every
(re)connect for what was committed while it was away. When the session drops it reconnects
with capped, jittered backoff; meanwhile the mail sender's sweep still finds every row, only
later.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import structlog

from nproxyd.core.clock import Clock
from nproxyd.core.errors import NproxydError
from nproxyd.core.ports import NotifySession, NotifySessions
from nproxyd.core.rules import backoff_seconds
from nproxyd.runtime.actor import EventLogger, sleep_until_set
from nproxyd.runtime.metrics import Metrics

NAME = "notify-listener"
PING_SECONDS = 30.0  # a silently dead session (no FIN) is noticed within this
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 30.0


class MailDueListener:
    """Runs until shutdown; database failures are retried here, never raised."""

    name = NAME

    def __init__(
        self,
        sessions: NotifySessions,
        *,
        wake: Callable[[], object],
        clock: Clock,
        metrics: Metrics,
        connect_timeout_seconds: float,
        ping_seconds: float = PING_SECONDS,
        rng: random.Random | None = None,
        logger: EventLogger | None = None,
    ) -> None:
        self._sessions = sessions
        self._wake = wake
        self._clock = clock
        self._metrics = metrics
        self._timeout = connect_timeout_seconds
        self._ping_seconds = ping_seconds
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log: EventLogger = (logger or structlog.get_logger()).bind(actor=NAME)
        self.connections = 0
        self.connected = False

    def _notified(self) -> None:
        self._metrics.wakeups.labels(source="notify").inc()
        self._wake()

    def status(self) -> dict[str, object]:
        """What ``/status`` shows: whether the session is open, and how often it was opened."""
        return {"connected": self.connected, "connections": self.connections}

    async def run(self, shutdown: anyio.Event) -> None:
        failures = 0
        while not shutdown.is_set():
            try:
                async with self._sessions(self._notified) as session:
                    failures = 0
                    self._connected(session)
                    await self._hold(session, shutdown)
            except NproxydError as exc:
                failures += 1
                if not shutdown.is_set():
                    self._failed(exc, failures, was_connected=self.connected)
            finally:
                self.connected = False
                self._metrics.listener_connected.set(0)
            if shutdown.is_set():
                return
            await self._back_off(max(failures, 1), shutdown)

    def _connected(self, session: NotifySession) -> None:
        self.connections += 1
        self.connected = True
        self._metrics.listener_connected.set(1)
        self._log.info("listener_connected", channel=session.channel, pid=session.backend_pid)
        self._notified()  # catch up on what was committed while no one listened

    async def _hold(self, session: NotifySession, shutdown: anyio.Event) -> None:
        """Return when shutdown is set; raise when the session is gone."""
        while True:
            await sleep_until_set(
                self._clock, self._ping_seconds, shutdown, session.lost, name=f"{NAME}.idle"
            )
            if shutdown.is_set():
                return
            if session.lost.is_set():
                raise ListenerLost
            with anyio.move_on_after(self._timeout) as scope:
                await session.ping()
            if scope.cancelled_caught:
                raise ListenerLost

    def _failed(self, exc: NproxydError, failures: int, *, was_connected: bool) -> None:
        """``listener_lost`` when an open session ended, else ``listener_connect_failed``."""
        self._log.warning(
            "listener_lost" if was_connected else "listener_connect_failed",
            error_class=type(exc).__name__,
            error_message=str(exc),
            consecutive_failures=failures,
        )

    async def _back_off(self, failures: int, shutdown: anyio.Event) -> None:
        delay = backoff_seconds(
            failures, base_seconds=RETRY_BASE_SECONDS, cap_seconds=RETRY_CAP_SECONDS, rng=self._rng
        )
        await sleep_until_set(self._clock, delay, shutdown, name=f"{NAME}.backoff")


class ListenerLost(NproxydError):
    """The LISTEN session ended."""
