"""The OutboxReady channel: a non-blocking fast path that wakes the mail sender at once."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from email.message import Message

import anyio
import pytest

from nproxyd.actors.mail_sender import MailPorts, MailSender, MailSettings
from nproxyd.core.channels import Channel, Outbox
from nproxyd.core.messages import OutboxReady
from nproxyd.core.records import MailOutcome, OutboxMail
from nproxyd.runtime.actor import ActorLoop
from tests.fakes.clock import FakeClock

pytestmark = pytest.mark.anyio

SWEEP_SECONDS = 15.0


class FakeOutbox:
    """An in-memory outbox: ``claim`` hands out every pending row once and records the call."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pending: list[OutboxMail] = []
        self.claims: list[float] = []
        self.recorded: list[MailOutcome] = []

    def add(self, mail_id: str) -> None:
        self.pending.append(
            OutboxMail(
                id=mail_id,
                to_address=f"{mail_id}@example.com",
                subject="Your nproxy subscription renewal invoice",
                body="hello",
                message_id=f"<{mail_id}@nproxy.localhost>",
                attempts=0,
            )
        )

    async def claim(
        self, now: datetime, lease_until: datetime, holder: str, limit: int
    ) -> list[OutboxMail]:
        self.claims.append(self.clock.monotonic())
        batch, self.pending = self.pending[:limit], self.pending[limit:]
        return batch

    async def due_mail(
        self, now: datetime, size: int, *, holder: str, lease_until: Callable[[], datetime]
    ) -> AsyncGenerator[list[OutboxMail], None]:
        while batch := await self.claim(now, lease_until(), holder, size):
            yield batch
            if len(batch) < size:
                return

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int:
        self.recorded.extend(outcomes)
        return len(outcomes)

    async def extend(self, ids: Sequence[str], holder: str, lease_until: datetime) -> int:
        return len(ids)


class RecordingTransport:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[str, float]] = []

    async def send(self, message: Message, recipient: str) -> None:
        self.sent.append((recipient, self.clock.monotonic()))

    async def aclose(self) -> None:
        pass


def mail_sender(clock: FakeClock, outbox: FakeOutbox, transport: RecordingTransport) -> MailSender:
    settings = MailSettings(
        interval_seconds=SWEEP_SECONDS,
        batch_size=100,
        lease_seconds=60,
        max_attempts=3,
        concurrency=2,
        from_address="billing@nproxy.localhost",
        instance_id="test",
        retry_base_seconds=30.0,
        retry_max_seconds=3600.0,
    )
    return MailSender(settings, MailPorts(store=outbox, transport=transport), clock)


@asynccontextmanager
async def running(loop: ActorLoop) -> AsyncIterator[None]:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop.run, shutdown, name="mail-sender-under-test")
        yield
        shutdown.set()
        tg.cancel_scope.cancel()


class TestChannel:
    def test_offer_on_a_full_channel_returns_false_and_counts_a_drop(self) -> None:
        """A full channel refuses the message at once (no waiting) and counts it as dropped."""
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](1)
        with sender, receiver:
            channel: Outbox = Channel(sender)
            assert channel.offer(OutboxReady(count=1)) is True
            assert channel.offer(OutboxReady(count=2)) is False
            assert channel.offer(OutboxReady(count=3)) is False
            assert (channel.sent, channel.dropped, channel.depth) == (1, 2, 1)
            assert receiver.receive_nowait() == OutboxReady(count=1)
            assert channel.depth == 0

    def test_offer_on_a_full_channel_never_blocks_the_sender(self) -> None:
        """offer is a plain function: on a full channel, with no event loop, it answers False."""
        assert not inspect.iscoroutinefunction(Channel.offer)
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](2)
        with sender, receiver:
            channel: Outbox = Channel(sender)
            # No event loop runs here: an offer that awaited or waited for room could not
            # return a bool at all.
            results = [channel.offer(OutboxReady(count=i)) for i in range(1000)]
            assert all(type(result) is bool for result in results)
            assert results[:2] == [True, True]
            assert not any(results[2:])
            assert channel.dropped == 998

    def test_offer_after_the_receiver_closed_counts_a_drop(self) -> None:
        """A channel whose receiver is gone drops the message instead of raising."""
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](4)
        receiver.close()
        with sender:
            channel: Outbox = Channel(sender)
            assert channel.offer(OutboxReady(count=1)) is False
            assert channel.dropped == 1
            assert channel.sent == 0

    def test_offer_after_the_sender_closed_counts_a_drop(self) -> None:
        """A closed sending side (daemon shutting down) drops the message instead of raising."""
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](4)
        with receiver:
            channel: Outbox = Channel(sender)
            sender.close()
            assert channel.offer(OutboxReady(count=1)) is False
            assert channel.dropped == 1


class TestMailSenderWake:
    async def test_outbox_ready_makes_the_mail_sender_tick_at_once(self) -> None:
        """An OutboxReady message delivers new mail at once, not at the next 15 s sweep."""
        clock = FakeClock()
        outbox, transport = FakeOutbox(clock), RecordingTransport(clock)
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](8)
        channel: Outbox = Channel(sender)
        loop = ActorLoop(mail_sender(clock, outbox, transport), clock, wake=receiver)
        with sender, receiver:
            async with running(loop):
                await clock.settle()
                assert outbox.claims == [0.0]  # the start-up sweep found nothing
                await clock.advance(3)
                outbox.add("m1")
                assert channel.offer(OutboxReady(count=1))
                await clock.settle()
                assert transport.sent == [("m1@example.com", 3.0)]
                assert outbox.claims == [0.0, 3.0]
                assert [outcome.status for outcome in outbox.recorded] == ["sent"]
                assert loop.stats.next_due_monotonic == 3.0 + SWEEP_SECONDS
        assert channel.depth == 0

    async def test_without_a_message_new_mail_waits_for_the_sweep(self) -> None:
        """Without a wake message, mail committed after a sweep waits for the next sweep."""
        clock = FakeClock()
        outbox, transport = FakeOutbox(clock), RecordingTransport(clock)
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](8)
        loop = ActorLoop(mail_sender(clock, outbox, transport), clock, wake=receiver)
        with sender, receiver:
            async with running(loop):
                await clock.advance(3)
                outbox.add("m1")
                await clock.advance(SWEEP_SECONDS - 3 - 0.5)
                assert transport.sent == []
                await clock.advance(0.5)
                assert transport.sent == [("m1@example.com", SWEEP_SECONDS)]
                assert outbox.claims == [0.0, SWEEP_SECONDS]

    async def test_a_burst_of_messages_is_coalesced(self) -> None:
        """A burst of ten messages sends every mail at once and adds at most one more tick."""
        clock = FakeClock()
        outbox, transport = FakeOutbox(clock), RecordingTransport(clock)
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](16)
        channel: Outbox = Channel(sender)
        loop = ActorLoop(mail_sender(clock, outbox, transport), clock, wake=receiver)
        with sender, receiver:
            async with running(loop):
                await clock.advance(1)
                for i in range(10):
                    outbox.add(f"m{i}")
                    channel.offer(OutboxReady(count=1))
                await clock.settle()
                assert len(transport.sent) == 10
                assert [o.status for o in outbox.recorded] == ["sent"] * 10
                assert loop.stats.ticks_failed == 0
                assert {at for _, at in transport.sent} == {1.0}
                assert outbox.claims[:2] == [0.0, 1.0]
                assert len(outbox.claims) <= 3
                assert loop.stats.ticks_run <= 3
                assert channel.dropped == 0
