"""The periodic actor loop, driven by a fake clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
import pytest
from structlog.testing import capture_logs

from nproxyd.core.errors import ProviderTransientError, StoreError
from nproxyd.core.messages import ExpirerReport, MailReport, RenewalReport, Report
from nproxyd.core.rules import backoff_seconds
from nproxyd.runtime.actor import BUG_TICKS_BEFORE_CRASH, ActorLoop, TickOutcome, root_cause
from tests.fakes.clock import FakeClock

pytestmark = pytest.mark.anyio


class TopRng(random.Random):
    """Jitter that always picks the upper bound, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


class ScriptedActor:
    """Ticks take scripted fake time; the first ``failures`` ticks raise."""

    def __init__(
        self,
        clock: FakeClock,
        *,
        interval_seconds: float = 10.0,
        durations: Sequence[float] = (),
        failures: int = 0,
    ) -> None:
        self.name = "test-actor"
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.durations = list(durations)
        self.failures = failures
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.nows: list[datetime] = []
        self.active = 0
        self.max_active = 0

    async def tick(self, now: datetime) -> Report:
        self.starts.append(self.clock.monotonic())
        self.nows.append(now)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            duration = self.durations.pop(0) if self.durations else 0.0
            await self.clock.sleep(duration)
            if len(self.starts) <= self.failures:
                raise ProviderTransientError("provider down")
            return ExpirerReport(expired_count=len(self.starts))
        finally:
            self.active -= 1
            self.ends.append(self.clock.monotonic())


class RecordingObserver:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[TickOutcome] = []

    def tick_started(self, actor: str) -> None:
        self.started.append(actor)

    def tick_finished(self, outcome: TickOutcome) -> None:
        self.finished.append(outcome)


@asynccontextmanager
async def running(loop: ActorLoop, shutdown: anyio.Event) -> AsyncIterator[anyio.Event]:
    """Run *loop* in the background; yield an event set when ``run`` returned."""
    done = anyio.Event()

    async def run() -> None:
        await loop.run(shutdown)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, name="loop-under-test")
        await anyio.lowlevel.checkpoint()
        yield done
        shutdown.set()
        tg.cancel_scope.cancel()  # a test that left a tick blocked on fake time must not hang


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestSchedule:
    async def test_ticks_are_anchored_at_tick_start(self, clock: FakeClock) -> None:
        """A 3 s tick every 10 s starts at 0, 10, 20, 30: its duration causes no drift."""
        actor = ScriptedActor(clock, interval_seconds=10, durations=[3] * 10)
        start = clock.now()
        async with running(ActorLoop(actor, clock), anyio.Event()):
            await clock.advance(35)
        assert actor.starts == [0, 10, 20, 30]
        assert actor.nows[1] == start + timedelta(seconds=10)

    async def test_overrun_is_awaited_and_followed_by_one_tick_not_a_burst(
        self, clock: FakeClock
    ) -> None:
        """A 25 s tick on a 10 s interval is awaited, then one tick runs at once, then on time."""
        actor = ScriptedActor(clock, interval_seconds=10, durations=[25])
        async with running(ActorLoop(actor, clock), anyio.Event()):
            await clock.advance(50)
        assert actor.starts == [0, 25, 35, 45]
        assert actor.max_active == 1

    async def test_stats_show_last_outcome_and_next_due(self, clock: FakeClock) -> None:
        """After a tick, stats carry its report and the next due time, monotonic and wall."""
        actor = ScriptedActor(clock, interval_seconds=10, durations=[3])
        observer = RecordingObserver()
        loop = ActorLoop(actor, clock, observer)
        start = clock.now()
        async with running(loop, anyio.Event()):
            assert loop.stats.running
            await clock.advance(4)
            stats = loop.stats
        assert not stats.running
        assert stats.ticks_run == 1
        assert stats.next_due_monotonic == 10
        assert stats.next_due_at == start + timedelta(seconds=10)
        assert stats.last_finished_at == start + timedelta(seconds=3)
        assert stats.last_outcome is not None
        assert stats.last_outcome.report == ExpirerReport(expired_count=1)
        assert stats.last_outcome.duration_seconds == 3
        assert observer.started == ["test-actor"]
        assert observer.finished == [stats.last_outcome]

    def test_non_positive_interval_is_refused(self, clock: FakeClock) -> None:
        """An interval of zero would spin; the loop refuses it."""
        with pytest.raises(ValueError, match="interval_seconds"):
            ActorLoop(ScriptedActor(clock, interval_seconds=0), clock)


class TestWake:
    async def test_five_wakeups_during_a_tick_make_exactly_one_follow_up(
        self, clock: FakeClock
    ) -> None:
        """Five wake messages during a 5 s tick coalesce into one tick right after it."""
        actor = ScriptedActor(clock, interval_seconds=100, durations=[5, 5])
        send, receive = anyio.create_memory_object_stream[object](10)
        loop = ActorLoop(actor, clock, wake=receive)
        async with running(loop, anyio.Event()):
            await clock.settle()
            for _ in range(5):
                send.send_nowait(object())
            await clock.advance(50)
            next_due = loop.stats.next_due_monotonic
        assert actor.starts == [0, 5]
        assert next_due == 105
        assert actor.max_active == 1

    async def test_wakeup_during_sleep_ticks_at_once(self, clock: FakeClock) -> None:
        """wake_now() while sleeping runs a tick immediately and re-anchors the schedule."""
        actor = ScriptedActor(clock, interval_seconds=100)
        loop = ActorLoop(actor, clock)
        async with running(loop, anyio.Event()):
            await clock.advance(30)
            loop.wake_now()
            await clock.settle()
            next_due = loop.stats.next_due_monotonic
        assert actor.starts == [0, 30]
        assert next_due == 130

    async def test_closed_wake_stream_is_ignored(self, clock: FakeClock) -> None:
        """Closing the wake stream neither stops the loop nor triggers ticks."""
        actor = ScriptedActor(clock, interval_seconds=10)
        send, receive = anyio.create_memory_object_stream[object](1)
        async with running(ActorLoop(actor, clock, wake=receive), anyio.Event()) as done:
            send.close()
            await clock.advance(25)
            assert not done.is_set()
        assert actor.starts == [0, 10, 20]


class TestFailures:
    async def test_failed_ticks_back_off_up_to_the_cap_then_reset(self, clock: FakeClock) -> None:
        """Failures are retried after 10, 20, 40, 40, 40 s (cap 40); success restores 10 s."""
        actor = ScriptedActor(clock, interval_seconds=10, failures=5)
        observer = RecordingObserver()
        with capture_logs() as logs:
            loop = ActorLoop(actor, clock, observer, max_backoff_seconds=40, rng=TopRng())
            async with running(loop, anyio.Event()) as done:
                await clock.advance(175)
                assert not done.is_set()
        assert actor.starts == [0, 10, 30, 70, 110, 150, 160, 170]
        assert [o.ok for o in observer.finished] == [False] * 5 + [True] * 3
        failed = [e for e in logs if e["event"] == "tick_failed"]
        assert [e["consecutive_failures"] for e in failed] == [1, 2, 3, 4, 5]
        assert failed[0]["actor"] == "test-actor"
        assert failed[0]["error_class"] == "ProviderTransientError"
        assert failed[0]["error_message"] == "provider down"
        assert [e["failed_ticks"] for e in logs if e["event"] == "tick_recovered"] == [5]
        assert loop.stats.consecutive_failures == 0
        assert loop.stats.ticks_failed == 5

    async def test_failure_outcome_names_the_error(self, clock: FakeClock) -> None:
        """The observer sees a failed tick's error class and message, and no report."""
        actor = ScriptedActor(clock, failures=1)
        observer = RecordingObserver()
        async with running(ActorLoop(actor, clock, observer), anyio.Event()):
            await clock.settle()
        (outcome,) = observer.finished
        assert (outcome.ok, outcome.report) == (False, None)
        assert (outcome.error_class, outcome.error_message) == (
            "ProviderTransientError",
            "provider down",
        )

    async def test_wakeup_does_not_cut_a_backoff_short(self, clock: FakeClock) -> None:
        """A wake-up during failure backoff waits for the retry, which serves it."""
        actor = ScriptedActor(clock, interval_seconds=10, failures=1)
        loop = ActorLoop(actor, clock, rng=TopRng())
        async with running(loop, anyio.Event()):
            await clock.advance(2)
            loop.wake_now()
            await clock.advance(3)
            assert actor.starts == [0]
            await clock.advance(10)
        assert actor.starts == [0, 10]

    def test_backoff_jitter_stays_between_half_and_full_delay(self) -> None:
        """Each delay lies in [0.5, 1] of min(cap, base * 2**(n-1)), even for huge n."""
        rng = random.Random(7)
        for attempt in [*range(1, 12), 5000]:
            ceiling = min(300.0, 10.0 * 2 ** min(attempt - 1, 60))
            delay = backoff_seconds(attempt, base_seconds=10, cap_seconds=300, rng=rng)
            assert 0.5 * ceiling <= delay <= ceiling


class TestShutdown:
    async def test_shutdown_cuts_a_long_sleep_short(self, clock: FakeClock) -> None:
        """Setting shutdown while sleeping an hour returns from run() without time passing."""
        actor = ScriptedActor(clock, interval_seconds=3600)
        shutdown = anyio.Event()
        loop = ActorLoop(actor, clock)
        async with running(loop, shutdown) as done:
            await clock.settle()
            shutdown.set()
            await clock.settle()
            assert done.is_set()
        assert clock.monotonic() == 0
        assert actor.starts == [0]
        assert loop.stats.next_due_monotonic is None

    async def test_shutdown_lets_the_running_tick_finish(self, clock: FakeClock) -> None:
        """Shutdown during a 5 s tick waits for it to finish, then run() returns."""
        actor = ScriptedActor(clock, interval_seconds=10, durations=[5])
        observer = RecordingObserver()
        shutdown = anyio.Event()
        async with running(ActorLoop(actor, clock, observer), shutdown) as done:
            await clock.settle()
            shutdown.set()
            await clock.settle()
            assert not done.is_set()
            await clock.advance(5)
            assert done.is_set()
        assert actor.ends == [5]
        assert [o.ok for o in observer.finished] == [True]

    async def test_cancellation_is_not_a_failed_tick(self, clock: FakeClock) -> None:
        """Cancelling the loop mid-tick propagates; nothing is recorded as a failure."""
        actor = ScriptedActor(clock, durations=[5])
        observer = RecordingObserver()
        loop = ActorLoop(actor, clock, observer)
        with anyio.move_on_after(5) as scope:  # real-time guard; cancelled far sooner
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop.run, anyio.Event(), name="loop-under-test")
                await clock.settle()
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert observer.finished == []
        assert loop.stats.ticks_failed == 0


class ReportingActor:
    """Every tick returns the given report, or raises the given exception."""

    def __init__(self, report: Report | None = None, error: Exception | None = None) -> None:
        self.name = "reporting-actor"
        self.interval_seconds = 10.0
        self.report = report or ExpirerReport()
        self.error = error

    async def tick(self, now: datetime) -> Report:
        if self.error is not None:
            raise self.error
        return self.report


async def first_outcome(clock: FakeClock, actor: ReportingActor) -> TickOutcome:
    observer = RecordingObserver()
    async with running(ActorLoop(actor, clock, observer), anyio.Event()):
        await clock.advance(1)
    return observer.finished[0]


class TestTruthfulOutcomes:
    async def test_a_renewal_tick_whose_claims_all_failed_is_degraded(
        self, clock: FakeClock
    ) -> None:
        """Renewal claimed 3, created none, 3 failed: outcome degraded, with the reason."""
        report = RenewalReport(claimed=3, created_count=0, transient_failures=3)
        with capture_logs() as logs:
            outcome = await first_outcome(clock, ReportingActor(report))
        assert outcome.ok
        assert outcome.outcome == "degraded"
        assert outcome.degraded is not None
        assert "all 3 claimed renewals failed" in outcome.degraded
        assert [log["log_level"] for log in logs if log["event"] == "tick_degraded"] == ["warning"]

    async def test_a_mail_tick_that_sent_nothing_of_what_it_claimed_is_degraded(
        self, clock: FakeClock
    ) -> None:
        """Mail claimed 2, sent none, both failed transiently: degraded; one sent: ok."""
        failed = MailReport(claimed=2, retried_count=2, failures={"transient": 2})
        partly = MailReport(claimed=2, sent_count=1, retried_count=1, failures={"transient": 1})
        assert (await first_outcome(clock, ReportingActor(failed))).outcome == "degraded"
        assert (await first_outcome(clock, ReportingActor(partly))).outcome == "ok"

    async def test_idle_and_partly_successful_renewal_ticks_are_ok(self, clock: FakeClock) -> None:
        """Nothing claimed, or one of two created, is an ok tick."""
        idle = RenewalReport(candidates=0)
        partly = RenewalReport(claimed=2, created_count=1, permanent_failures=1)
        assert (await first_outcome(clock, ReportingActor(idle))).outcome == "ok"
        assert (await first_outcome(clock, ReportingActor(partly))).outcome == "ok"

    async def test_a_task_group_error_is_reported_as_its_cause(self, clock: FakeClock) -> None:
        """An ExceptionGroup from a task group is reported by the class and text of its cause."""
        inner = ExceptionGroup("unhandled errors in a TaskGroup", [StoreError("relation gone")])
        error = ExceptionGroup("unhandled errors in a TaskGroup", [inner])
        outcome = await first_outcome(clock, ReportingActor(error=error))
        assert outcome.outcome == "error"
        assert outcome.error_class == "StoreError"
        assert outcome.error_message == "relation gone"

    async def test_sibling_errors_of_a_group_are_counted_in_the_message(
        self, clock: FakeClock
    ) -> None:
        """A group of two errors reports the first one's cause and says one more failed."""
        error = ExceptionGroup("two", [StoreError("first"), RuntimeError("second")])
        outcome = await first_outcome(clock, ReportingActor(error=error))
        assert outcome.error_class == "StoreError"
        assert outcome.error_message == "first (and 1 more error)"


class TestProgrammingErrors:
    async def test_a_bug_fails_the_tick_logged_at_error_with_its_traceback(
        self, clock: FakeClock
    ) -> None:
        """A tick raising a non-project error is counted and logged at error with exc_info."""
        actor = ReportingActor(error=KeyError("plan"))
        observer = RecordingObserver()
        with capture_logs() as logs:
            async with running(ActorLoop(actor, clock, observer), anyio.Event()):
                await clock.advance(1)
        failed = [e for e in logs if e["event"] == "tick_failed"]
        assert observer.finished[0].error_class == "KeyError"
        assert [e["log_level"] for e in failed] == ["error"]
        assert isinstance(failed[0]["exc_info"], KeyError)

    async def test_a_project_error_is_a_warning_without_traceback(self, clock: FakeClock) -> None:
        """A tick failing on a project error is logged at warning, without exc_info."""
        actor = ReportingActor(error=StoreError("relation gone"))
        with capture_logs() as logs:
            async with running(ActorLoop(actor, clock), anyio.Event()):
                await clock.advance(1)
        (failed,) = [e for e in logs if e["event"] == "tick_failed"]
        assert failed["log_level"] == "warning"
        assert "exc_info" not in failed

    async def test_a_repeating_bug_leaves_the_loop_for_the_supervisor(
        self, clock: FakeClock
    ) -> None:
        """The third consecutive tick failing on a bug raises it out of ``run``."""
        actor = ReportingActor(error=TypeError("a bug"))
        loop = ActorLoop(actor, clock, max_backoff_seconds=10, rng=TopRng())
        raised: list[BaseException] = []

        async def run() -> None:
            try:
                await loop.run(anyio.Event())
            except Exception as exc:  # the loop's task group wraps it
                raised.append(root_cause(exc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await clock.advance(100)
            tg.cancel_scope.cancel()
        assert [(type(exc), str(exc)) for exc in raised] == [(TypeError, "a bug")]
        assert loop.stats.ticks_failed == BUG_TICKS_BEFORE_CRASH

    async def test_project_errors_never_leave_the_loop(self, clock: FakeClock) -> None:
        """Ticks failing on project errors are retried forever, however many fail."""
        actor = ReportingActor(error=StoreError("down"))
        loop = ActorLoop(actor, clock, max_backoff_seconds=10, rng=TopRng())
        async with running(loop, anyio.Event()) as done:
            await clock.advance(100)
            assert not done.is_set()
        assert loop.stats.ticks_failed > BUG_TICKS_BEFORE_CRASH
