"""A fake :class:`~nproxyd.core.clock.Clock` that moves only when the test says so."""

from __future__ import annotations

import heapq
import itertools
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel

DEFAULT_START = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)

# Enough event-loop turns for a woken task to finish its chain of wake-ups (cancel scopes,
# task-group exits, stream hand-offs) and block again; cheap, as each turn is a sleep(0).
SETTLE_TURNS = 100


class FakeClock:
    """Wall time and monotonic time advance together, only through :meth:`advance`.

    ``sleep`` blocks until a test advances past the sleeper's deadline; sleepers wake in
    deadline order (ties in the order they went to sleep), each seeing ``monotonic()`` equal
    to its deadline, and the event loop settles after each so the woken task runs.
    """

    def __init__(self, start: datetime = DEFAULT_START, *, monotonic_start: float = 0.0) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._wall_offset = start - timedelta(seconds=monotonic_start)
        self._monotonic = monotonic_start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self._wall_offset + timedelta(seconds=self._monotonic)

    def monotonic(self) -> float:
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        entry = (self._monotonic + seconds, next(self._order), anyio.Event())
        heapq.heappush(self._sleepers, entry)
        try:
            await entry[2].wait()
        finally:
            if entry in self._sleepers:  # cancelled before its deadline
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    def set_now(self, value: datetime) -> None:
        """Jump the wall clock (as an NTP step would); monotonic time is unaffected."""
        self._wall_offset = value - timedelta(seconds=self._monotonic)

    @property
    def deadlines(self) -> list[float]:
        """Monotonic deadlines of the tasks sleeping now, earliest first."""
        return sorted(deadline for deadline, _, _ in self._sleepers)

    async def settle(self) -> None:
        """Let every runnable task run until it blocks again."""
        for _ in range(SETTLE_TURNS):
            await anyio.lowlevel.checkpoint()

    async def advance(self, seconds: float) -> None:
        """Move time forward by *seconds*, waking due sleepers one by one."""
        if seconds < 0:
            raise ValueError("time never goes backwards")
        await self.advance_to(self._monotonic + seconds)

    async def advance_to(self, target: float) -> None:
        """Move monotonic time forward to *target*, waking due sleepers one by one."""
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, event = heapq.heappop(self._sleepers)
            self._monotonic = max(self._monotonic, deadline)
            event.set()
            await self.settle()
        self._monotonic = max(self._monotonic, target)
        await self.settle()
