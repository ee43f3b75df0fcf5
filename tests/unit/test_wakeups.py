"""Where mail-sender ticks come from: nproxyd_wakeups_total{source="notify|local|sweep"}."""

from __future__ import annotations

import anyio
import pytest

from nproxyd.runtime.actor import ActorLoop
from nproxyd.runtime.metrics import Metrics
from tests.fakes.clock import FakeClock
from tests.unit.test_actor_loop import ScriptedActor, running

pytestmark = pytest.mark.anyio


class TestTimerTicks:
    async def test_only_ticks_started_by_the_interval_count_as_timer_ticks(self) -> None:
        """Two elapsed intervals count two; a tick started by a wake-up counts none."""
        clock = FakeClock()
        actor = ScriptedActor(clock, interval_seconds=10)
        loop = ActorLoop(actor, clock)
        async with running(loop, anyio.Event()):
            await clock.advance(20)
            loop.wake_now()
            await clock.settle()
            stats = loop.stats
        assert actor.starts == [0, 10, 20, 20]
        assert stats.timer_ticks == 2


class TestWakeupMetric:
    def test_counts_kept_elsewhere_are_added_once(self) -> None:
        """Syncing the same running total twice adds it once; a larger total adds the rest."""
        metrics = Metrics(["mail-sender"])
        metrics.count_wakeups("local", 3)
        metrics.count_wakeups("local", 3)
        metrics.count_wakeups("local", 5)
        text = metrics.render().decode()
        assert 'nproxyd_wakeups_total{source="local"} 5.0' in text
        assert 'nproxyd_wakeups_total{source="notify"} 0.0' in text
        assert 'nproxyd_wakeups_total{source="sweep"} 0.0' in text
        assert "nproxyd_listener_connected 0.0" in text
