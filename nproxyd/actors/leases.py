"""Leases that outlive a slow batch: extended in the background while the work runs.

A lease is stamped from the tick's ``now`` plus the time the tick has already spent, so a
lease taken late in a long tick never starts in the past, and a tick run with an injected time
behaves as it would at that time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
import structlog

from nproxyd.core.clock import Clock
from nproxyd.core.errors import NproxydError


class LeaseDeadlines:
    """Computes lease deadlines for one tick."""

    def __init__(self, clock: Clock, now: datetime, lease_seconds: float) -> None:
        self.clock = clock
        self.now = now
        self.lease_seconds = lease_seconds
        self.started = clock.monotonic()

    def deadline(self) -> datetime:
        elapsed = self.clock.monotonic() - self.started
        return self.now + timedelta(seconds=elapsed + self.lease_seconds)


@asynccontextmanager
async def kept_alive(
    leases: LeaseDeadlines, extend: Callable[[datetime], Awaitable[object]], *, what: str
) -> AsyncIterator[None]:
    """Extend a lease every third of its length until the block exits."""

    async def heartbeat() -> None:
        log = structlog.get_logger()
        while True:
            await leases.clock.sleep(leases.lease_seconds / 3)
            try:
                await extend(leases.deadline())
            except NproxydError as exc:
                # The lease may lapse; the work is fenced, so at worst it is done again.
                log.warning("lease_extend_failed", lease=what, error_message=exc.message)

    async with anyio.create_task_group() as group:
        group.start_soon(heartbeat, name=f"lease-heartbeat-{what}")
        try:
            yield
        finally:
            group.cancel_scope.cancel()
