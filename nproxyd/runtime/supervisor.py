"""An OTP-style one-for-one supervisor over one anyio task group.

Children run until shutdown. A child that raises, or returns while shutdown is not set, has
crashed (a bug, not a failed tick): it is restarted after capped, jittered exponential backoff.
More than ``max_restarts`` restarts within ``restart_window_seconds`` (OTP's intensity and
period, counted over all children) means restarting does not help: the supervisor sets
shutdown, lets the other children finish and raises :class:`SupervisorGaveUp`.
"""

from __future__ import annotations

import random
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import structlog

from nproxyd.core.clock import Clock
from nproxyd.core.errors import SupervisorGaveUp
from nproxyd.core.rules import backoff_seconds
from nproxyd.runtime.actor import EventLogger, root_cause, sleep_until_set

ChildFactory = Callable[[anyio.Event], Awaitable[None]]


@dataclass(frozen=True)
class _Child:
    name: str
    factory: ChildFactory


def _crash_site(exc: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame: where the bug is, without data."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"


class Supervisor:
    """Starts, watches and restarts named children; see the module docstring."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_restarts: int,
        restart_window_seconds: float,
        max_backoff_seconds: float = 30,
        base_backoff_seconds: float = 1,
        rng: random.Random | None = None,
        logger: EventLogger | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if max_restarts < 0 or restart_window_seconds <= 0:
            raise ValueError("max_restarts must be >= 0 and restart_window_seconds > 0")
        self._clock = clock
        self._max_restarts = max_restarts
        self._window = restart_window_seconds
        self._max_backoff = max_backoff_seconds
        self._base_backoff = base_backoff_seconds
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log: EventLogger = logger or structlog.get_logger()
        self._on_restart = on_restart
        self._children: list[_Child] = []
        self._restarts: dict[str, int] = {}
        self._recent: deque[float] = deque()
        self._gave_up_on: str | None = None
        self._running = False

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, per child name."""
        return dict(self._restarts)

    @property
    def healthy(self) -> bool:
        """False once the supervisor gave up."""
        return self._gave_up_on is None

    def add(self, name: str, factory: ChildFactory) -> None:
        """Register a child: ``factory(shutdown)`` must run until *shutdown* is set."""
        if self._running:
            raise RuntimeError("children must be added before the supervisor runs")
        if name in self._restarts:
            raise ValueError(f"duplicate child name: {name}")
        self._children.append(_Child(name, factory))
        self._restarts[name] = 0

    async def run(self, shutdown: anyio.Event) -> None:
        """Run every child until all have returned after *shutdown*.

        Raises :class:`SupervisorGaveUp` if restarts exceeded the intensity.
        """
        self._running = True
        try:
            async with anyio.create_task_group() as tg:
                for child in self._children:
                    tg.start_soon(self._supervise, child, shutdown, name=child.name)
        finally:
            self._running = False
        if self._gave_up_on is not None:
            raise SupervisorGaveUp(self._gave_up_on)

    async def _supervise(self, child: _Child, shutdown: anyio.Event) -> None:
        log = self._log.bind(actor=child.name)
        attempt = 0
        while True:
            started = self._clock.monotonic()
            await self._run_child(child, shutdown, log)
            if shutdown.is_set():
                return
            if not self._may_restart(child.name, log, shutdown):
                return
            # A child that ran for a whole window was healthy; its next crash is a new story.
            ran_for = self._clock.monotonic() - started
            attempt = 1 if ran_for >= self._window else attempt + 1
            delay = backoff_seconds(
                attempt,
                base_seconds=self._base_backoff,
                cap_seconds=self._max_backoff,
                rng=self._rng,
            )
            log.info("actor_restarting", attempt=attempt, delay_seconds=round(delay, 3))
            await sleep_until_set(self._clock, delay, shutdown, name=f"{child.name}.backoff")
            if shutdown.is_set():
                return
            self._restarts[child.name] += 1
            if self._on_restart is not None:
                self._on_restart(child.name)

    async def _run_child(self, child: _Child, shutdown: anyio.Event, log: EventLogger) -> None:
        try:
            await child.factory(shutdown)
        except Exception as raised:
            exc = root_cause(raised)
            # No message or traceback on purpose: an unexpected error may carry data (a DSN,
            # a key) that no adapter vetted. Class and crash site locate the bug.
            log.error(  # noqa: TRY400
                "actor_crashed",
                error_class=type(exc).__name__,
                crash_site=_crash_site(exc),
                shutting_down=shutdown.is_set(),
            )
        else:
            if not shutdown.is_set():
                log.error("actor_crashed", error_class="ReturnedBeforeShutdown")

    def _may_restart(self, name: str, log: EventLogger, shutdown: anyio.Event) -> bool:
        """Count a restart in the sliding window; give up (and set shutdown) past intensity."""
        now = self._clock.monotonic()
        while self._recent and self._recent[0] <= now - self._window:
            self._recent.popleft()
        self._recent.append(now)
        if len(self._recent) <= self._max_restarts:
            return True
        if self._gave_up_on is None:
            self._gave_up_on = name
            log.error(
                "supervisor_gave_up",
                restarts_in_window=len(self._recent),
                max_restarts=self._max_restarts,
                restart_window_seconds=self._window,
            )
        shutdown.set()
        return False
