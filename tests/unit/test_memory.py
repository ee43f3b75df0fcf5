"""Heap trimming after ticks that did work."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nproxyd.core.messages import ExpirerReport, MailReport
from nproxyd.runtime.actor import NullObserver, TickOutcome
from nproxyd.runtime.memory import HeapTrimming, malloc_trim

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


class Counted:
    """A trim that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.finished: list[TickOutcome] = []

    def tick_finished(self, outcome: TickOutcome) -> None:
        self.finished.append(outcome)


def worked(at_seconds: float, *, idle: bool = False) -> TickOutcome:
    report = MailReport(claimed=0) if idle else ExpirerReport(expired_count=7500)
    return TickOutcome(
        actor="invoice-expirer",
        started_at=T0 + timedelta(seconds=at_seconds),
        duration_seconds=0.5,
        ok=True,
        report=report,
    )


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class TestHeapTrimming:
    def test_trims_after_a_tick_with_work_at_most_once_per_interval(self) -> None:
        """A tick with work trims; another within the interval does not; one after it does."""
        trim = Counted()
        trimming = HeapTrimming(NullObserver(), trim, interval_seconds=30)
        trimming.tick_finished(worked(0))
        trimming.tick_finished(worked(10))
        assert trim.calls == 1
        trimming.tick_finished(worked(31))
        assert trim.calls == 2

    def test_an_idle_or_failed_tick_does_not_trim(self) -> None:
        """Ticks without work (idle report, or an exception) leave the heap alone."""
        trim = Counted()
        trimming = HeapTrimming(NullObserver(), trim)
        trimming.tick_finished(worked(0, idle=True))
        failed = TickOutcome(actor="a", started_at=T0, duration_seconds=0.1, ok=False)
        trimming.tick_finished(failed)
        assert trim.calls == 0

    def test_every_outcome_reaches_the_observer_it_wraps(self) -> None:
        """Trimming is transparent: the monitor sees every start and outcome."""
        recorder = Recorder()
        trimming = HeapTrimming(recorder, Counted())
        outcomes = [worked(0), worked(1, idle=True)]
        for outcome in outcomes:
            trimming.tick_finished(outcome)
        assert recorder.finished == outcomes

    def test_without_malloc_trim_it_does_nothing_and_says_so_once(self) -> None:
        """A C library without malloc_trim is logged once at start, then ticks pass through."""
        with capture_logs() as logs:
            trimming = HeapTrimming(NullObserver(), None)
            trimming.tick_finished(worked(0))
            trimming.tick_finished(worked(60))
        assert [entry["event"] for entry in logs] == ["heap_trim_unavailable"]
        assert trimming.trims == 0


@pytest.mark.skipif(malloc_trim() is None, reason="this C library has no malloc_trim")
class TestGlibcMallocTrim:
    def test_malloc_trim_returns_freed_pages_to_the_system(self) -> None:
        """After a burst of freed allocations, glibc's malloc_trim lowers the RSS."""
        trim = malloc_trim()
        assert trim is not None
        trim()
        burst = [bytearray(700) for _ in range(40_000)]  # ~30 MB in glibc's heap
        keep = [bytearray(700) for _ in range(50)]  # allocated last: pins the heap's top
        del burst
        gc.collect()
        before = rss_kib()
        trim()
        after = rss_kib()
        assert keep
        assert before - after > 10_000, (before, after)
