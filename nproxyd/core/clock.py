"""The clock: the only module that reads the time or sleeps.

Everything else receives ``now`` as an argument or a :class:`Clock` to call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    async def sleep(self, seconds: float) -> None:
        """Sleep; cancellable."""


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        # anyio here, not at the top: the command line reads the configuration (and begins
        # the embedded server's start) before importing any of the async stack.
        import anyio  # noqa: PLC0415

        await anyio.sleep(seconds)


def parse_instant(text: str) -> datetime:
    """Parse an ISO-8601 instant; a naive value is taken as UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_instant(value: datetime) -> str:
    """Format as UTC with milliseconds and a ``Z``: ``2026-03-12T11:00:00.000Z``."""
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    if utc.year >= 1000:  # isoformat is several times cheaper than strftime, same text
        return utc.isoformat(timespec="milliseconds")[:-6] + "Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
