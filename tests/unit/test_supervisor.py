"""The supervisor: restarts with backoff, and gives up past the restart intensity."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from structlog.testing import capture_logs

from nproxyd.core.errors import SupervisorGaveUp
from nproxyd.runtime.supervisor import Supervisor
from tests.fakes.clock import FakeClock

pytestmark = pytest.mark.anyio

Child = Callable[[anyio.Event], Awaitable[None]]


class TopRng(random.Random):
    """Jitter that always picks the upper bound, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Crasher:
    """A child that runs ``run_for`` fake seconds, then crashes its first ``times`` runs."""

    def __init__(self, clock: FakeClock, *, times: int, run_for: float = 0.0) -> None:
        self.clock = clock
        self.times = times
        self.run_for = run_for
        self.calls: list[float] = []

    async def __call__(self, shutdown: anyio.Event) -> None:
        self.calls.append(self.clock.monotonic())
        await self.clock.sleep(self.run_for)
        if len(self.calls) <= self.times:
            raise RuntimeError("bug")
        await shutdown.wait()


class Outcome:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


@asynccontextmanager
async def running(sup: Supervisor, shutdown: anyio.Event) -> AsyncIterator[Outcome]:
    """Run *sup* in the background; the yielded outcome records how run() ended."""
    outcome = Outcome()

    async def run() -> None:
        try:
            await sup.run(shutdown)
        except SupervisorGaveUp as exc:
            outcome.error = exc
        outcome.done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, name="supervisor-under-test")
        await anyio.lowlevel.checkpoint()
        yield outcome
        shutdown.set()
        tg.cancel_scope.cancel()  # never hang on a child blocked on fake time


def make_supervisor(clock: FakeClock, **overrides: object) -> tuple[Supervisor, list[str]]:
    restarted: list[str] = []
    options: dict[str, object] = {
        "max_restarts": 100,
        "restart_window_seconds": 60,
        "max_backoff_seconds": 30,
        "rng": TopRng(),
        "on_restart": restarted.append,
        **overrides,
    }
    return Supervisor(clock, **options), restarted  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestRestart:
    async def test_crashing_child_is_restarted_with_backoff(self, clock: FakeClock) -> None:
        """Two crashes are restarted after 1 s then 2 s; on_restart counts both."""
        sup, restarted = make_supervisor(clock)
        flaky = Crasher(clock, times=2)
        sup.add("flaky", flaky)
        shutdown = anyio.Event()
        with capture_logs() as logs:
            async with running(sup, shutdown) as outcome:
                await clock.advance(10)
                shutdown.set()
                await clock.settle()
                assert outcome.done.is_set()
        assert flaky.calls == [0, 1, 3]
        assert restarted == ["flaky", "flaky"]
        assert sup.restarts == {"flaky": 2}
        crashes = [e for e in logs if e["event"] == "actor_crashed"]
        assert [(e["actor"], e["error_class"]) for e in crashes] == [("flaky", "RuntimeError")] * 2
        assert "test_supervisor.py" in crashes[0]["crash_site"]
        assert sup.healthy
        assert outcome.error is None

    async def test_crash_inside_a_task_group_is_logged_by_its_cause(self, clock: FakeClock) -> None:
        """A child whose task group wraps a KeyError is logged as KeyError at its source."""

        async def grouped(shutdown: anyio.Event) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(shutdown.wait, name="waiter")
                raise KeyError("plan")

        sup, _ = make_supervisor(clock)
        sup.add("grouped", grouped)
        with capture_logs() as logs:
            async with running(sup, anyio.Event()):
                await clock.settle()
        crash = next(e for e in logs if e["event"] == "actor_crashed")
        assert crash["error_class"] == "KeyError"
        assert crash["crash_site"].endswith("in grouped")

    async def test_restart_backoff_is_capped(self, clock: FakeClock) -> None:
        """Backoff doubles from 1 s and stops growing at max_backoff_seconds (4 s)."""
        sup, _ = make_supervisor(clock, max_backoff_seconds=4)
        flaky = Crasher(clock, times=1000)
        sup.add("flaky", flaky)
        async with running(sup, anyio.Event()):
            await clock.advance(16)
        gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False)]
        assert gaps == [1, 2, 4, 4, 4]

    async def test_child_returning_before_shutdown_is_restarted(self, clock: FakeClock) -> None:
        """A child that returns while shutdown is unset has crashed and is restarted."""
        calls: list[float] = []

        async def quitter(shutdown: anyio.Event) -> None:
            calls.append(clock.monotonic())
            if len(calls) > 1:
                await shutdown.wait()

        sup, restarted = make_supervisor(clock)
        sup.add("quitter", quitter)
        with capture_logs() as logs:
            async with running(sup, anyio.Event()):
                await clock.advance(5)
        assert calls == [0, 1]
        assert restarted == ["quitter"]
        assert [e["error_class"] for e in logs if e["event"] == "actor_crashed"] == [
            "ReturnedBeforeShutdown"
        ]

    async def test_shutdown_waits_for_children_and_never_restarts(self, clock: FakeClock) -> None:
        """After shutdown, a child crashing while stopping is not restarted; run() returns."""

        async def steady(shutdown: anyio.Event) -> None:
            await shutdown.wait()

        async def messy(shutdown: anyio.Event) -> None:
            await shutdown.wait()
            await clock.sleep(2)  # finishing its work
            raise RuntimeError("bug while stopping")

        sup, restarted = make_supervisor(clock)
        sup.add("steady", steady)
        sup.add("messy", messy)
        shutdown = anyio.Event()
        async with running(sup, shutdown) as outcome:
            shutdown.set()
            await clock.settle()
            assert not outcome.done.is_set()
            await clock.advance(2)
            assert outcome.done.is_set()
        assert restarted == []
        assert outcome.error is None
        assert sup.restarts == {"steady": 0, "messy": 0}

    def test_duplicate_child_name_is_refused(self, clock: FakeClock) -> None:
        """Two children with one name would make restart counts ambiguous."""
        sup, _ = make_supervisor(clock)
        sup.add("a", Crasher(clock, times=0))
        with pytest.raises(ValueError, match="duplicate"):
            sup.add("a", Crasher(clock, times=0))


class TestIntensity:
    async def test_too_many_restarts_in_the_window_gives_up(self, clock: FakeClock) -> None:
        """A third crash within 60 s with max_restarts=2 stops everything, naming the actor."""
        stopped: list[str] = []

        async def steady(shutdown: anyio.Event) -> None:
            await shutdown.wait()
            stopped.append("steady")

        sup, restarted = make_supervisor(clock, max_restarts=2, restart_window_seconds=60)
        sup.add("steady", steady)
        sup.add("flaky", Crasher(clock, times=1000))
        shutdown = anyio.Event()
        with capture_logs() as logs:
            async with running(sup, shutdown) as outcome:
                await clock.advance(10)
                assert outcome.done.is_set()
        assert isinstance(outcome.error, SupervisorGaveUp)
        assert outcome.error.actor == "flaky"
        assert shutdown.is_set()
        assert stopped == ["steady"]
        assert not sup.healthy
        assert restarted == ["flaky", "flaky"]
        gave_up = [e for e in logs if e["event"] == "supervisor_gave_up"]
        assert [e["actor"] for e in gave_up] == ["flaky"]

    async def test_zero_max_restarts_gives_up_on_the_first_crash(self, clock: FakeClock) -> None:
        """max_restarts=0 allows no restart at all (as in OTP)."""
        sup, restarted = make_supervisor(clock, max_restarts=0)
        sup.add("flaky", Crasher(clock, times=1))
        async with running(sup, anyio.Event()) as outcome:
            await clock.settle()
        assert isinstance(outcome.error, SupervisorGaveUp)
        assert restarted == []

    async def test_restarts_spread_wider_than_the_window_never_give_up(
        self, clock: FakeClock
    ) -> None:
        """A child crashing every 16 s with max_restarts=1 per 10 s is restarted forever."""
        sup, restarted = make_supervisor(clock, max_restarts=1, restart_window_seconds=10)
        slow = Crasher(clock, times=1000, run_for=15)
        sup.add("slow", slow)
        async with running(sup, anyio.Event()) as outcome:
            await clock.advance(200)
            assert not outcome.done.is_set()
        assert slow.calls == [16.0 * n for n in range(13)]
        assert len(restarted) == 12
        assert sup.healthy
