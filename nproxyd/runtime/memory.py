"""Give the heap pages a large tick freed back to the system (glibc ``malloc_trim``).

A tick that handles thousands of rows (a renewal tick of several thousand invoices) allocates
many short-lived objects at once. When they are freed, glibc keeps the pages that held them:
free chunks inside the heap, below live objects allocated later, are not returned by ``free``.
The process's RSS then settles at the high-water mark of its largest tick and steps up each
time a tick is larger than any before it, although nothing is leaked (docs/benchmarks.md,
"Memory under sustained load"). ``malloc_trim(0)`` hands every whole free page back.

:class:`HeapTrimming` does that after a tick that did work, at most once per
:data:`TRIM_INTERVAL_SECONDS` (a trim walks the free chunks and gives whole free pages back:
about 2 ms with 18 MB to give back, microseconds with nothing). Where the C library has no
``malloc_trim`` (musl, macOS) it does nothing and logs that once.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from nproxyd.runtime.actor import TickObserver, TickOutcome

TRIM_INTERVAL_SECONDS = 30.0

Trim = Callable[[], object]


def malloc_trim() -> Trim | None:
    """``malloc_trim(0)`` of the C library, or ``None`` where it has none."""
    try:
        # The process's own symbols, the C library's among them: no library search (which
        # runs ldconfig in a subprocess) on the start-up path.
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


class HeapTrimming:
    """A tick observer: passes every outcome on, then trims the heap after a tick with work."""

    def __init__(
        self,
        inner: TickObserver,
        trim: Trim | None,
        interval_seconds: float = TRIM_INTERVAL_SECONDS,
    ) -> None:
        self.inner = inner
        self.trim = trim
        self.interval = timedelta(seconds=interval_seconds)
        self.last_trim: datetime | None = None
        self.trims = 0
        if trim is None:
            structlog.get_logger().bind(component="memory").info(
                "heap_trim_unavailable", reason="the C library has no malloc_trim"
            )

    def tick_started(self, actor: str) -> None:
        self.inner.tick_started(actor)

    def tick_finished(self, outcome: TickOutcome) -> None:
        self.inner.tick_finished(outcome)
        if self.trim is None or outcome.report is None or outcome.report.idle():
            return
        finished = outcome.started_at + timedelta(seconds=outcome.duration_seconds)
        if self.last_trim is not None and finished - self.last_trim < self.interval:
            return
        self.last_trim = finished
        self.trims += 1
        self.trim()
