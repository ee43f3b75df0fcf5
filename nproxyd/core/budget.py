"""A shared request budget: a small token bucket on the injected clock.

Every call to one provider takes a token, so status polling and invoice creation together stay
under the provider's rate limit. Low-priority callers (status checks) leave a reserve in the
bucket, so a burst of polling never makes invoice creation wait for long; a 429 answer pauses
every caller for its ``Retry-After``.
"""

from __future__ import annotations

from nproxyd.core.clock import Clock

POLL_RESERVE = 0.4  # share of the bucket status checks leave to invoice creation


class RequestBudget:
    def __init__(self, rate_per_second: float, clock: Clock) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        self.rate = rate_per_second
        self.capacity = max(1.0, rate_per_second)
        self.clock = clock
        self._tokens = self.capacity
        self._updated = clock.monotonic()
        self._paused_until = self._updated

    def __repr__(self) -> str:
        return f"RequestBudget(rate_per_second={self.rate})"

    async def acquire(self, *, low_priority: bool = False) -> None:
        """Wait for a token (and for any pause to end), then take it."""
        need = 1.0
        if low_priority:
            need = min(1.0 + POLL_RESERVE * self.capacity, self.capacity)
        while True:
            now = self._refill()
            wait = self._paused_until - now
            if wait <= 0 and self._tokens >= need:
                self._tokens -= 1.0
                return
            if wait <= 0:
                wait = (need - self._tokens) / self.rate
            await self.clock.sleep(wait)

    def pause(self, seconds: float) -> None:
        """No call for ``seconds`` (the provider's Retry-After)."""
        self._paused_until = max(self._paused_until, self.clock.monotonic() + max(seconds, 0.0))

    def _refill(self) -> float:
        now = self.clock.monotonic()
        elapsed = max(now - self._updated, 0.0)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now
        return now
