"""Readiness reasons judged from tick outcomes and database gauges, on a fake clock."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import pytest

from nproxyd.core.config import HealthConfig
from nproxyd.core.messages import RenewalReport, Report
from nproxyd.runtime.actor import ActorLoop, TickOutcome
from nproxyd.runtime.metrics import DatabaseSnapshot, Metrics
from nproxyd.runtime.ops import Monitor, OpsQueries
from nproxyd.runtime.supervisor import Supervisor
from tests.fakes.clock import FakeClock

pytestmark = pytest.mark.anyio

RENEWAL = "renewal-scheduler"


class StubActor:
    """Only its name and interval matter: the tests report its ticks to the monitor."""

    def __init__(self, name: str, interval_seconds: float) -> None:
        self.name = name
        self.interval_seconds = interval_seconds

    async def tick(self, now: datetime) -> Report:
        return RenewalReport()


def snapshot(oldest_age: float = 0.0) -> DatabaseSnapshot:
    return DatabaseSnapshot(
        outbox_pending=1,
        mail_dead=0,
        oldest_pending_age_seconds=oldest_age,
        renewal_claims={},
        provider_keys={},
    )


def make_state(clock: FakeClock, *, interval: float = 3000) -> OpsQueries:
    monitor = Monitor(clock, Metrics([RENEWAL]))
    loop = ActorLoop(StubActor(RENEWAL, interval), clock, monitor)
    state = OpsQueries(
        clock=clock,
        instance_id="test",
        loops={RENEWAL: loop},
        supervisor=Supervisor(clock, max_restarts=5, restart_window_seconds=60),
        monitor=monitor,
        health=cast(Any, None),
        keys=cast(Any, None),
        channel=cast(Any, None),
        settings=HealthConfig(provider_failing_seconds=1800, outbox_stuck_seconds=900),
        retry_windows={RENEWAL: 3660},
    )
    state.snapshot = snapshot()
    return state


def tick(state: OpsQueries, clock: FakeClock, report: RenewalReport) -> None:
    state.monitor.tick_started(RENEWAL)
    state.monitor.tick_finished(
        TickOutcome(
            actor=RENEWAL,
            started_at=clock.now(),
            duration_seconds=0.1,
            ok=True,
            report=report,
            degraded=report.degraded(),
        )
    )


def codes(state: OpsQueries) -> set[str]:
    return {reason.reason for reason in state.reasons()}


FAILED = RenewalReport(claimed=2, transient_failures=2)
IDLE = RenewalReport()
CREATED = RenewalReport(claimed=1, created_count=1)


class TestProviderFailing:
    async def test_degraded_ticks_for_the_configured_time_make_provider_failing(self) -> None:
        """Degraded renewal ticks for 1800 s, idle ticks between them, give provider_failing."""
        clock = FakeClock()
        state = make_state(clock)
        tick(state, clock, FAILED)
        assert codes(state) == set()
        await clock.advance(1000)
        tick(state, clock, IDLE)
        await clock.advance(800)
        tick(state, clock, FAILED)
        assert codes(state) == {"provider_failing"}
        (reason,) = state.reasons()
        assert reason.actor == RENEWAL
        assert "all 2 claimed renewals failed" in reason.detail

    async def test_a_tick_that_created_an_invoice_ends_the_streak(self) -> None:
        """One renewal created resets the streak: 1800 s must pass again."""
        clock = FakeClock()
        state = make_state(clock)
        tick(state, clock, FAILED)
        await clock.advance(1800)
        tick(state, clock, CREATED)
        assert codes(state) == set()
        tick(state, clock, FAILED)
        await clock.advance(1799)
        tick(state, clock, FAILED)
        assert codes(state) == set()

    async def test_a_streak_without_retries_past_the_retry_window_no_longer_counts(self) -> None:
        """No degraded tick for longer than the retry cap: nothing is left failing."""
        clock = FakeClock()
        state = make_state(clock, interval=5000)
        tick(state, clock, FAILED)
        await clock.advance(1800)
        tick(state, clock, FAILED)
        await clock.advance(3660)
        assert codes(state) == {"provider_failing"}
        await clock.advance(1)
        assert codes(state) == set()


class TestOutboxAndStalls:
    async def test_due_mail_older_than_the_limit_is_outbox_stuck(self) -> None:
        """Due mail waiting 900 s is fine; 901 s is outbox_stuck."""
        clock = FakeClock()
        state = make_state(clock)
        tick(state, clock, IDLE)
        state.snapshot = snapshot(oldest_age=900)
        assert codes(state) == set()
        state.snapshot = snapshot(oldest_age=901)
        assert codes(state) == {"outbox_stuck"}

    async def test_an_unread_database_is_database_unreachable(self) -> None:
        """Without a database read the reason is database_unreachable, and no outbox verdict."""
        clock = FakeClock()
        state = make_state(clock)
        tick(state, clock, IDLE)
        state.snapshot = None
        assert codes(state) == {"database_unreachable"}

    async def test_a_running_tick_counts_until_max_tick_seconds(self) -> None:
        """A tick begun on time keeps the actor ready past 3 intervals, up to max_tick_seconds."""
        clock = FakeClock()
        state = make_state(clock, interval=10)
        tick(state, clock, IDLE)
        await clock.advance(10)
        state.monitor.tick_started(RENEWAL)
        await clock.advance(899)
        assert codes(state) == set()
        await clock.advance(2)
        assert codes(state) == {"actor_stalled"}
        assert "running" in state.reasons()[0].detail

    async def test_a_first_tick_still_running_is_not_ready(self) -> None:
        """Before any tick returned, a running tick does not prove the actor works."""
        clock = FakeClock()
        state = make_state(clock, interval=10)
        state.monitor.tick_started(RENEWAL)
        await clock.advance(1)
        assert codes(state) == {"actor_stalled"}
