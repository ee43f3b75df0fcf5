"""The periodic actor loop, written once for every actor.

An :class:`ActorLoop` runs one :class:`Actor`: it awaits a tick, then sleeps on the injected
:class:`~nproxyd.core.clock.Clock` until the next tick is due, a wake-up arrives or shutdown is
set. Ticks of one actor never overlap; wake-ups during a tick coalesce into one follow-up tick;
a failed tick is retried with capped, jittered exponential backoff and never ends the loop.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import structlog

from nproxyd.core.clock import Clock
from nproxyd.core.errors import NproxydError
from nproxyd.core.messages import Report
from nproxyd.core.rules import backoff_seconds

# Keeps 2**n finite; any realistic cap is reached long before.


class Actor(Protocol):
    """A periodic unit of work: one tick per interval, reporting what it did."""

    @property
    def name(self) -> str: ...

    @property
    def interval_seconds(self) -> float: ...

    async def tick(self, now: datetime) -> Report: ...


class EventLogger(Protocol):
    """The part of a structlog bound logger the runtime uses."""

    def bind(self, **new_values: Any) -> EventLogger: ...

    def debug(self, event: str, **kw: Any) -> Any: ...

    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...

    def error(self, event: str, **kw: Any) -> Any: ...


class TickOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one tick did: its report, or the class and message of the exception it raised.

    ``ok`` means the tick returned; ``degraded`` is then why its report says it did not do its
    job (every work item failed), from :meth:`Report.degraded`.
    """

    actor: str
    started_at: datetime
    duration_seconds: float
    ok: bool
    report: Report | None = None
    error_class: str | None = None
    error_message: str | None = None
    degraded: str | None = None

    @property
    def outcome(self) -> str:
        """``ok``, ``degraded`` (returned, but every work item failed) or ``error`` (raised)."""
        if not self.ok:
            return "error"
        return "degraded" if self.degraded is not None else "ok"


def root_cause(exc: BaseException) -> BaseException:
    """The exception a task group wrapped: the first leaf of nested exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# Consecutive ticks failing on a programming error (not a project error) before the loop
# itself raises it, so the supervisor restarts the loop and, if that repeats, stops the daemon.
BUG_TICKS_BEFORE_CRASH = 3


def is_bug(exc: BaseException) -> bool:
    """True when ``exc`` (or any error of its group) is not one of the project's errors: the
    adapters and stores classify every expected failure, so anything else is a bug."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_bug(inner) for inner in exc.exceptions)
    return not isinstance(exc, NproxydError)


def describe_error(exc: BaseException) -> tuple[str, str]:
    """Class name and message of *exc*'s root cause, noting siblings a group dropped."""
    cause = root_cause(exc)
    message = str(cause)
    others = _leaf_count(exc) - 1
    if others > 0:
        message = f"{message} (and {others} more error{'s' if others > 1 else ''})"
    return type(cause).__name__, message


def _leaf_count(exc: BaseException) -> int:
    if isinstance(exc, BaseExceptionGroup):
        return sum(_leaf_count(inner) for inner in exc.exceptions)
    return 1


class TickObserver(Protocol):
    """Watches ticks (metrics, health). Called from the loop; must not block."""

    def tick_started(self, actor: str) -> None: ...

    def tick_finished(self, outcome: TickOutcome) -> None: ...


class NullObserver:
    """An observer that ignores everything."""

    def tick_started(self, actor: str) -> None:
        pass

    def tick_finished(self, outcome: TickOutcome) -> None:
        pass


class LoopStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one loop's state, for ``/status``. Wall times are UTC."""

    actor: str
    interval_seconds: float
    running: bool = False
    ticks_run: int = 0
    ticks_failed: int = 0
    consecutive_failures: int = 0
    ticks_degraded: int = 0
    last_started_at: datetime | None = None
    last_finished_at: datetime | None = None
    last_outcome: TickOutcome | None = None
    next_due_monotonic: float | None = None
    next_due_at: datetime | None = None
    timer_ticks: int = 0  # ticks started because the interval elapsed, not by a wake-up


async def sleep_until_set(
    clock: Clock, seconds: float, *events: anyio.Event, name: str = "sleep"
) -> None:
    """Sleep *seconds* on *clock*, cut short as soon as any of *events* is set."""
    if seconds <= 0 or any(event.is_set() for event in events):
        await anyio.lowlevel.checkpoint()
        return
    async with anyio.create_task_group() as tg:
        for event in events:
            tg.start_soon(_cancel_when_set, event, tg.cancel_scope, name=f"{name}.interrupt")
        await clock.sleep(seconds)
        tg.cancel_scope.cancel()


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _drain_buffered(wake: anyio.abc.ObjectReceiveStream[object]) -> None:
    """Take every message already buffered, so a burst sent at once is one wake-up."""
    receive_nowait = getattr(wake, "receive_nowait", None)
    if receive_nowait is None:
        return
    while True:
        try:
            receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return


class ActorLoop:
    """Runs one actor's ticks until shutdown. See the module docstring for the rules."""

    def __init__(
        self,
        actor: Actor,
        clock: Clock,
        observer: TickObserver | None = None,
        *,
        wake: anyio.abc.ObjectReceiveStream[object] | None = None,
        max_backoff_seconds: float = 300,
        rng: random.Random | None = None,
        logger: EventLogger | None = None,
    ) -> None:
        if actor.interval_seconds <= 0:
            raise ValueError(f"{actor.name}: interval_seconds must be positive")
        self._actor = actor
        self._clock = clock
        self._observer: TickObserver = observer or NullObserver()
        self._wake = wake
        self._max_backoff_seconds = max_backoff_seconds
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log = (logger or structlog.get_logger()).bind(actor=actor.name)
        self._wake_event = anyio.Event()
        self._bug_streak = 0  # consecutive ticks that failed on a programming error
        self._stats = LoopStats(actor=actor.name, interval_seconds=actor.interval_seconds)

    @property
    def name(self) -> str:
        return self._actor.name

    @property
    def stats(self) -> LoopStats:
        return self._stats

    def wake_now(self) -> None:
        """Ask for a tick as soon as the current one (if any) finishes; same as a wake message."""
        self._wake_event.set()

    async def run(self, shutdown: anyio.Event) -> None:
        """Tick until *shutdown* is set; a running tick is finished first, never cancelled."""
        async with anyio.create_task_group() as tg:
            if self._wake is not None:
                tg.start_soon(self._drain_wake, self._wake, name=f"{self.name}.wake")
            try:
                await self._loop(shutdown)
            finally:
                tg.cancel_scope.cancel()

    async def _loop(self, shutdown: anyio.Event) -> None:
        while not shutdown.is_set():
            due = await self._tick_once()
            if shutdown.is_set():
                break
            await self._sleep_until(due, shutdown)
        self._stats = msgspec.structs.replace(
            self._stats, next_due_monotonic=None, next_due_at=None
        )

    async def _drain_wake(self, wake: anyio.abc.ObjectReceiveStream[object]) -> None:
        # Draining continuously keeps senders from blocking while a tick runs; every message
        # only sets the flag, which is what coalesces a burst into one follow-up tick.
        try:
            async for _ in wake:
                _drain_buffered(wake)
                self._wake_event.set()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def _tick_once(self) -> float:
        """Run one tick; return the monotonic time the next one is due."""
        self._wake_event = anyio.Event()  # this tick serves every earlier wake-up
        start = self._clock.monotonic()
        started_at = self._clock.now()
        self._stats = msgspec.structs.replace(
            self._stats,
            running=True,
            last_started_at=started_at,
            next_due_monotonic=None,
            next_due_at=None,
        )
        self._observer.tick_started(self.name)
        try:
            report = await self._actor.tick(started_at)
        except Exception as exc:
            due = self._finish(self._outcome(started_at, start, error=exc), start, exc)
            self._escalate(exc)
            return due
        self._bug_streak = 0
        return self._finish(self._outcome(started_at, start, report=report), start)

    def _escalate(self, exc: Exception) -> None:
        """Raise a programming error that failed :data:`BUG_TICKS_BEFORE_CRASH` ticks running."""
        self._bug_streak = self._bug_streak + 1 if is_bug(exc) else 0
        if self._bug_streak >= BUG_TICKS_BEFORE_CRASH:
            self._bug_streak = 0
            raise exc

    def _outcome(
        self,
        started_at: datetime,
        start: float,
        *,
        report: Report | None = None,
        error: Exception | None = None,
    ) -> TickOutcome:
        error_class, error_message = (None, None) if error is None else describe_error(error)
        return TickOutcome(
            actor=self.name,
            started_at=started_at,
            duration_seconds=max(self._clock.monotonic() - start, 0.0),
            ok=error is None,
            report=report,
            error_class=error_class,
            error_message=error_message,
            degraded=None if report is None else report.degraded(),
        )

    def _finish(self, outcome: TickOutcome, start: float, error: Exception | None = None) -> float:
        failures = 0 if outcome.ok else self._stats.consecutive_failures + 1
        if outcome.ok:
            # Anchored at the tick's start, so tick duration never makes the schedule drift;
            # an overrun yields one immediate tick, never a burst of missed ones.
            due = start + self._actor.interval_seconds
            if self._stats.consecutive_failures:
                self._log.info("tick_recovered", failed_ticks=self._stats.consecutive_failures)
            if outcome.degraded is not None:
                self._log.warning("tick_degraded", reason=outcome.degraded)
            self._log.debug(
                "tick_finished",
                outcome=outcome.outcome,
                duration_seconds=round(outcome.duration_seconds, 6),
            )
        else:
            delay = self._retry_delay(failures)
            due = self._clock.monotonic() + delay
            self._log_failure(outcome, failures, delay, error)
        self._stats = msgspec.structs.replace(
            self._stats,
            running=False,
            ticks_run=self._stats.ticks_run + 1,
            ticks_failed=self._stats.ticks_failed + (0 if outcome.ok else 1),
            ticks_degraded=self._stats.ticks_degraded + (outcome.degraded is not None),
            consecutive_failures=failures,
            last_finished_at=self._clock.now(),
            last_outcome=outcome,
            next_due_monotonic=due,
            next_due_at=self._wall_time(due),
        )
        self._observer.tick_finished(outcome)
        return due

    def _retry_delay(self, failures: int) -> float:
        interval = self._actor.interval_seconds
        cap = max(self._max_backoff_seconds, interval)
        return backoff_seconds(failures, base_seconds=interval, cap_seconds=cap, rng=self._rng)

    def _log_failure(
        self, outcome: TickOutcome, failures: int, delay: float, error: Exception | None
    ) -> None:
        """A project error is a warning; a programming error is an error, with its traceback."""
        fields: dict[str, Any] = {
            "error_class": outcome.error_class,
            "error_message": outcome.error_message,
            "consecutive_failures": failures,
            "retry_in_seconds": round(delay, 3),
        }
        if error is not None and is_bug(error):
            self._log.error("tick_failed", exc_info=error, **fields)
        else:
            self._log.warning("tick_failed", **fields)

    def _wall_time(self, monotonic: float) -> datetime:
        return self._clock.now() + timedelta(seconds=monotonic - self._clock.monotonic())

    async def _sleep_until(self, due: float, shutdown: anyio.Event) -> None:
        # A wake-up never cuts a failure backoff short: the backoff protects whatever the
        # tick depends on. The wake-up stays pending and is served by the retry tick.
        events = [shutdown]
        if self._stats.consecutive_failures == 0:
            events.append(self._wake_event)
        delay = due - self._clock.monotonic()
        await sleep_until_set(self._clock, delay, *events, name=f"{self.name}.sleep")
        if not shutdown.is_set() and not self._wake_event.is_set():
            self._stats = msgspec.structs.replace(
                self._stats, timer_ticks=self._stats.timer_ticks + 1
            )
