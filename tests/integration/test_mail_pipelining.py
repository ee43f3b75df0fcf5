"""RFC 2920 PIPELINING in the SMTP transport: one write for the envelope, the same answers.

Every refusal position of the pipelined group (MAIL, RCPT, DATA, end of data) is classified as
in lock-step, each with the same server once with and once without PIPELINING; a drop or a
non-UTF-8 reply in the middle of a group is handled as a drop or a cleaned reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from email.message import Message

import anyio
import msgspec
import pytest

from nproxyd.adapters.mail_smtp import PIPELINE_DEPTH, SmtpTransport
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import SmtpConfig
from nproxyd.core.errors import (
    MailError,
    MailPermanentError,
    MailTransientError,
    MailUnavailableError,
)
from nproxyd.core.mail import compose_message
from nproxyd.core.text import is_storable
from tests.fakes.raw_smtp import RawSmtpServer

pytestmark = pytest.mark.anyio

FROM = "nproxy billing <billing@nproxy.localhost>"
REFUSED = "refused@example.test"
GOOD = "good@example.test"


def compose(to: str, number: int = 0) -> Message:
    return compose_message(
        from_address=FROM,
        to_address=to,
        subject="Hello",
        body="Body\n.leading period\n",
        message_id=f"<pipe-{number}@nproxy.localhost>",
        date=SystemClock().now(),
    )


@pytest.fixture(params=[True, False], ids=["pipelining", "lock-step"])
def server(request: pytest.FixtureRequest) -> Iterator[RawSmtpServer]:
    with RawSmtpServer(pipelining=request.param) as running:
        yield running


@pytest.fixture
def pipelining_server() -> Iterator[RawSmtpServer]:
    with RawSmtpServer(pipelining=True) as running:
        yield running


def transport_for(
    server: RawSmtpServer, timeout: float = 5.0, max_connections: int | None = None
) -> SmtpTransport:
    config = SmtpConfig(host=server.host, port=server.port, timeout_seconds=timeout)
    if max_connections is not None:
        config = msgspec.structs.replace(config, max_connections=max_connections)
    return SmtpTransport(config)


def envelope_groups(server: RawSmtpServer) -> list[list[bytes]]:
    """The groups of commands that arrived together, by verb, without EHLO and QUIT."""
    verbs = [[line[:4].upper() for line in group] for group in server.command_groups]
    return [group for group in verbs if group not in ([b"EHLO"], [b"QUIT"])]


class TestWrites:
    async def test_pipelining_sends_the_envelope_in_one_write(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A server offering PIPELINING gets MAIL, RCPT and DATA together, for every message."""
        transport = transport_for(pipelining_server)
        for number in range(3):
            await transport.send(compose(GOOD, number), GOOD)
        await transport.aclose()

        assert envelope_groups(pipelining_server) == [[b"MAIL", b"RCPT", b"DATA"]] * 3
        assert len(pipelining_server.messages) == 3
        assert transport.connections_opened == 1

    async def test_without_pipelining_each_command_waits_for_its_reply(self) -> None:
        """A server not offering PIPELINING gets one command at a time (lock-step)."""
        with RawSmtpServer(pipelining=False) as server:
            transport = transport_for(server)
            for number in range(2):
                await transport.send(compose(GOOD, number), GOOD)
            await transport.aclose()

            assert envelope_groups(server) == [[b"MAIL"], [b"RCPT"], [b"DATA"]] * 2
            assert len(server.messages) == 2

    async def test_body_arrives_intact_with_periods_stuffed(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """The body goes after 354 with its leading periods doubled on the wire, intact after."""
        transport = transport_for(pipelining_server)
        await transport.send(compose(GOOD), GOOD)
        await transport.aclose()

        (message,) = pipelining_server.messages
        assert b"\r\n.leading period\r\n" in message.raw
        assert message.rcpt_tos == (GOOD,)


class TestRefusalPositions:
    @pytest.mark.parametrize(
        ("where", "reply", "expected"),
        [
            ("mail", b"550 5.7.1 sender refused", MailPermanentError),
            ("mail", b"451 4.3.0 sender later", MailTransientError),
            ("rcpt", b"550 5.1.1 no such user", MailPermanentError),
            ("rcpt", b"452 4.2.2 mailbox full", MailTransientError),
            ("data", b"554 5.5.1 no data for you", MailPermanentError),
            ("data", b"451 4.3.0 data later", MailTransientError),
            ("data_end", b"554 5.7.1 content refused", MailPermanentError),
            ("data_end", b"451 4.3.0 queue full", MailTransientError),
        ],
    )
    async def test_refusal_is_classified_and_the_connection_reused(
        self, server: RawSmtpServer, where: str, reply: bytes, expected: type[MailError]
    ) -> None:
        """A 5xx at any position is permanent, a 4xx transient; the next mail goes on the same
        connection after RSET."""
        if where == "mail":
            server.answer_mail(reply)
        elif where == "rcpt":
            server.answer_rcpt(REFUSED, reply)
        elif where == "data":
            server.answer_data(reply)
        else:
            server.answer_data_end(REFUSED, reply)
        transport = transport_for(server)

        with pytest.raises(MailError) as caught:
            await transport.send(compose(REFUSED), REFUSED)
        server.answer_mail(b"250 2.1.0 OK")
        server.answer_data(b"354 go ahead")
        await transport.send(compose(GOOD, 1), GOOD)
        await transport.aclose()

        assert type(caught.value) is expected
        assert reply[:3].decode() in caught.value.message
        assert [message.rcpt_tos for message in server.messages] == [(GOOD,)]
        assert transport.connections_opened == 1

    async def test_non_utf8_reply_in_a_group_is_cleaned_from_its_bytes(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A Latin-1 refusal of RCPT inside the pipelined group is permanent, one U+FFFD a byte."""
        pipelining_server.answer_rcpt(REFUSED, b"550-5.1.1 Empf\xe4nger\r\n550 5.1.1 unbekannt\xff")
        transport = transport_for(pipelining_server)

        with pytest.raises(MailPermanentError) as caught:
            await transport.send(compose(REFUSED), REFUSED)
        await transport.aclose()

        assert is_storable(caught.value.message)
        assert "Empf\ufffdnger\n5.1.1 unbekannt\ufffd" in caught.value.message

    async def test_drop_mid_group_on_a_fresh_connection_is_unavailable(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A connection dropped instead of the RCPT reply says nothing about the mail."""
        pipelining_server.drop_at("rcpt")
        transport = transport_for(pipelining_server)

        with pytest.raises(MailUnavailableError):
            await transport.send(compose(GOOD), GOOD)
        await transport.aclose()

        assert pipelining_server.messages == []

    async def test_drop_mid_group_on_a_pooled_connection_is_retried_once(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A pooled connection dropped mid-group is retried once on a fresh one: delivered once."""
        transport = transport_for(pipelining_server)
        await transport.send(compose(GOOD, 0), GOOD)
        pipelining_server.drop_at("data")

        await transport.send(compose(GOOD, 1), GOOD)
        await transport.aclose()

        assert pipelining_server.message_ids() == {
            "<pipe-0@nproxy.localhost>": 1,
            "<pipe-1@nproxy.localhost>": 1,
        }
        assert transport.connections_opened == 2

    async def test_refusal_before_a_drop_is_the_answer(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A RCPT 550 that arrived before the connection dropped is the mail's permanent answer."""
        pipelining_server.answer_rcpt(REFUSED, b"550 5.1.1 no such user")
        pipelining_server.drop_at("data")  # the server answers DATA by hanging up
        transport = transport_for(pipelining_server)

        with pytest.raises(MailPermanentError, match="550"):
            await transport.send(compose(REFUSED), REFUSED)
        await transport.aclose()

    @pytest.mark.parametrize(
        ("stage", "expected"),
        [("mail", MailUnavailableError), ("data", MailTransientError)],
    )
    async def test_silence_in_a_group(
        self, pipelining_server: RawSmtpServer, stage: str, expected: type[MailError]
    ) -> None:
        """Silence before the recipient was accepted is unavailability, after it transient."""
        pipelining_server.stall_at(stage)  # type: ignore[arg-type]
        transport = transport_for(pipelining_server, timeout=0.5)

        with pytest.raises(MailError) as caught:
            await transport.send(compose(GOOD), GOOD)
        await transport.aclose()

        assert type(caught.value) is expected


class TestReplyFraming:
    async def test_trickled_pipelined_replies(self, pipelining_server: RawSmtpServer) -> None:
        """Replies split byte by byte still pair with their commands: both mails go once."""
        pipelining_server.trickle(0.001)
        transport = transport_for(pipelining_server)
        await transport.send(compose(GOOD, 0), GOOD)
        await transport.send(compose(GOOD, 1), GOOD)
        await transport.aclose()

        assert len(pipelining_server.messages) == 2
        assert transport.connections_opened == 1

    async def test_garbled_reply_closes_the_connection(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A reply that is not SMTP is transient and its connection is never reused."""
        await assert_garbled(pipelining_server, b"hello, this is not SMTP")


async def assert_garbled(server: RawSmtpServer, reply: bytes) -> None:
    """``reply`` to a mail's RCPT makes that mail transient; the next mail is delivered on a
    new connection."""
    server.answer_rcpt(REFUSED, reply)
    transport = transport_for(server)

    with pytest.raises(MailTransientError):
        await transport.send(compose(REFUSED), REFUSED)
    await transport.send(compose(GOOD, 1), GOOD)
    await transport.aclose()

    assert transport.connections_opened == 2
    assert len(server.messages) == 1


class TestReplyCodes:
    @pytest.mark.parametrize("code", [b"600", b"199", b"000"])
    async def test_a_code_outside_smtp_is_garbled_not_permanent(
        self, server: RawSmtpServer, code: bytes
    ) -> None:
        """A reply code SMTP does not have (first digit not 2-5) never kills the mail: it is
        a garbled reply, transient, and its connection is not reused."""
        await assert_garbled(server, code + b" no such reply")

    @pytest.mark.parametrize("line", [b"5501 four digits", b"2500 four digits", b"250x text"])
    async def test_a_code_not_followed_by_a_separator_is_garbled(
        self, server: RawSmtpServer, line: bytes
    ) -> None:
        """Three digits then anything but a space, a hyphen or the line's end is not a reply
        code: garbled and transient, never read as the code its first digits spell."""
        await assert_garbled(server, line)


@pytest.fixture
def lock_step_server() -> Iterator[RawSmtpServer]:
    with RawSmtpServer(pipelining=False) as running:
        yield running


class TestPool:
    async def test_send_waiting_for_a_connection_learns_the_transport_closed(
        self, lock_step_server: RawSmtpServer
    ) -> None:
        """With every connection busy, each waiting send is refused as unavailable on close."""
        lock_step_server.stall_at("data_end")
        config = SmtpConfig(
            host=lock_step_server.host,
            port=lock_step_server.port,
            timeout_seconds=30.0,
            max_connections=1,
        )
        transport = SmtpTransport(config)
        outcomes: dict[str, BaseException | None] = {}

        async def send(name: str) -> None:
            try:
                await transport.send(compose(GOOD), GOOD)
            except MailError as exc:
                outcomes[name] = exc
            else:
                outcomes[name] = None

        async with anyio.create_task_group() as group:
            group.start_soon(send, "busy")
            await wait_until(lambda: transport.connections_opened == 1)
            group.start_soon(send, "waiting-1")
            group.start_soon(send, "waiting-2")
            await anyio.sleep(0.05)
            await transport.aclose()
            await wait_until(lambda: {"waiting-1", "waiting-2"} <= outcomes.keys())
            lock_step_server.stop()  # only now is the busy send let go

        for name in ("waiting-1", "waiting-2"):
            refused = outcomes[name]
            assert isinstance(refused, MailUnavailableError)
            assert "closed" in refused.message
        assert isinstance(outcomes["busy"], MailUnavailableError)  # its connection dropped


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.01)


async def send_all(
    transport: SmtpTransport, mails: list[tuple[str, int]], senders: int
) -> dict[int, MailError | None]:
    """Send ``mails`` (recipient, number) from ``senders`` concurrent tasks; outcome by number."""
    outcomes: dict[int, MailError | None] = {}
    queue = iter(mails)

    async def sender() -> None:
        for recipient, number in queue:
            try:
                await transport.send(compose(recipient, number), recipient)
            except MailError as exc:
                outcomes[number] = exc
            else:
                outcomes[number] = None

    async with anyio.create_task_group() as group:
        for _ in range(senders):
            group.start_soon(sender)
    return outcomes


def one_connection(server: RawSmtpServer) -> SmtpTransport:
    return SmtpTransport(SmtpConfig(host=server.host, port=server.port, max_connections=1))


class TestAcrossMessages:
    async def test_next_envelope_goes_with_the_body(self, pipelining_server: RawSmtpServer) -> None:
        """Two sends sharing a pipelining connection write one's body with the other's envelope."""
        transport = one_connection(pipelining_server)

        outcomes = await send_all(transport, [(GOOD, number) for number in range(6)], senders=2)
        await transport.aclose()

        assert outcomes == dict.fromkeys(range(6))
        assert len(pipelining_server.message_ids()) == 6
        assert pipelining_server.commands_after_data >= 1
        assert transport.connections_opened == 1

    async def test_lock_step_server_never_gets_a_command_behind_a_body(
        self, lock_step_server: RawSmtpServer
    ) -> None:
        """Without PIPELINING, a second send waits for the first one's final reply."""
        transport = one_connection(lock_step_server)

        outcomes = await send_all(transport, [(GOOD, number) for number in range(4)], senders=2)
        await transport.aclose()

        assert outcomes == dict.fromkeys(range(4))
        assert lock_step_server.commands_after_data == 0

    @pytest.mark.parametrize(
        ("reply", "expected"),
        [
            (b"554 5.7.1 content refused", MailPermanentError),
            (b"451 4.3.0 later", MailTransientError),
        ],
    )
    async def test_refused_body_leaves_the_next_message_alone(
        self, pipelining_server: RawSmtpServer, reply: bytes, expected: type[MailError]
    ) -> None:
        """A refusal at one message's end of data is its own; the one behind it is delivered."""
        pipelining_server.answer_data_end(REFUSED, reply)
        transport = one_connection(pipelining_server)

        outcomes = await send_all(transport, [(REFUSED, 0), (GOOD, 1), (GOOD, 2)], senders=2)
        await transport.aclose()

        assert type(outcomes[0]) is expected
        assert (outcomes[1], outcomes[2]) == (None, None)
        assert pipelining_server.message_ids() == {
            "<pipe-1@nproxy.localhost>": 1,
            "<pipe-2@nproxy.localhost>": 1,
        }
        assert transport.connections_opened == 1

    async def test_refused_envelope_is_reset_in_the_write_of_the_next_envelope(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """After a refused envelope, RSET and the next message's envelope go in one write."""
        pipelining_server.answer_rcpt(REFUSED, b"550 5.1.1 no such user")
        transport = one_connection(pipelining_server)

        outcomes = await send_all(transport, [(REFUSED, 0), (GOOD, 1), (GOOD, 2)], senders=2)
        await transport.aclose()

        assert isinstance(outcomes[0], MailPermanentError)
        assert (outcomes[1], outcomes[2]) == (None, None)
        assert [b"RSET", b"MAIL", b"RCPT", b"DATA"] in envelope_groups(pipelining_server)
        assert pipelining_server.message_ids() == {
            "<pipe-1@nproxy.localhost>": 1,
            "<pipe-2@nproxy.localhost>": 1,
        }
        assert transport.connections_opened == 1

    async def test_refused_reset_moves_the_next_message_to_a_fresh_connection(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """An RSET refused after a refused envelope fails the connection: the message pipelined
        behind is sent once on a fresh connection, without an answer counted against it."""
        pipelining_server.answer_rcpt(REFUSED, b"550 5.1.1 no such user")
        pipelining_server.answer_rset(b"500 5.5.1 no")
        transport = one_connection(pipelining_server)

        outcomes = await send_all(transport, [(REFUSED, 0), (GOOD, 1)], senders=2)
        await transport.aclose()

        assert isinstance(outcomes[0], MailPermanentError)
        assert outcomes[1] is None
        assert pipelining_server.message_ids() == {"<pipe-1@nproxy.localhost>": 1}
        assert transport.connections_opened == 2

    async def test_data_accepted_after_a_refusal_moves_the_next_message_to_a_fresh_connection(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A 354 after a refused recipient (the server waits for a body) is never answered with
        the next envelope: that message goes at once (no reply timeout) on a fresh connection."""
        pipelining_server.answer_rcpt(REFUSED, b"550 5.1.1 no such user")
        pipelining_server.answer_data_without_recipient(b"354 go ahead anyway")
        transport = SmtpTransport(
            SmtpConfig(
                host=pipelining_server.host,
                port=pipelining_server.port,
                max_connections=1,
                timeout_seconds=600,
            )
        )

        with anyio.fail_after(60):  # far below the reply timeout a wrong write would wait for
            outcomes = await send_all(transport, [(REFUSED, 0), (GOOD, 1)], senders=2)
        await transport.aclose()

        assert isinstance(outcomes[0], MailPermanentError)
        assert "550" in outcomes[0].message
        assert outcomes[1] is None
        assert pipelining_server.message_ids() == {"<pipe-1@nproxy.localhost>": 1}
        assert transport.connections_opened == 2

    async def test_drop_after_a_body_costs_the_next_message_nothing(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A drop instead of one message's final reply: the one behind is retried and sent once."""
        pipelining_server.drop_at("data_end")
        transport = one_connection(pipelining_server)

        outcomes = await send_all(transport, [(GOOD, 0), (GOOD, 1)], senders=2)
        await transport.aclose()

        assert isinstance(outcomes[0], MailUnavailableError)
        assert outcomes[1] is None
        assert pipelining_server.message_ids()["<pipe-1@nproxy.localhost>"] == 1

    async def test_silence_on_one_body_costs_the_next_message_nothing(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A server silent on one message's end of data: that one is transient, the one pipelined
        behind it is retried on a fresh connection and sent, not deferred as an outage."""
        pipelining_server.stall_at("data_end")
        transport = SmtpTransport(
            SmtpConfig(
                host=pipelining_server.host,
                port=pipelining_server.port,
                max_connections=1,
                timeout_seconds=0.5,
            )
        )

        outcomes = await send_all(transport, [(GOOD, 0), (GOOD, 1)], senders=2)
        await transport.aclose()

        assert isinstance(outcomes[0], MailTransientError)
        assert outcomes[1] is None
        assert pipelining_server.message_ids()["<pipe-1@nproxy.localhost>"] == 1

    async def test_sends_waiting_while_a_connect_fails_do_not_connect_again(self) -> None:
        """A server refusing connections is asked at most once per connection slot."""
        with RawSmtpServer() as server:
            server.drop_at("connect", count=100)
            transport = SmtpTransport(
                SmtpConfig(host=server.host, port=server.port, max_connections=2)
            )

            outcomes = await send_all(transport, [(GOOD, number) for number in range(8)], 8)
            await transport.aclose()

            assert all(isinstance(outcome, MailUnavailableError) for outcome in outcomes.values())
            assert len(outcomes) == 8
            assert server.connections <= 2


class TestInFlight:
    """A connection that fails with a full pipeline (``PIPELINE_DEPTH`` messages in flight)
    lets every send behind it end: retried on a fresh connection once it frees its slot."""

    async def test_every_retry_after_a_timeout_with_a_full_pipeline_ends(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A reply timeout with a full pipeline: the messages behind are all retried and sent."""
        pipelining_server.stall_at("data_end")
        transport = transport_for(pipelining_server, timeout=0.5, max_connections=1)
        mails = [(GOOD, number) for number in range(PIPELINE_DEPTH)]

        with anyio.move_on_after(10) as scope:
            outcomes = await send_all(transport, mails, senders=PIPELINE_DEPTH)
        await transport.aclose()

        assert not scope.cancelled_caught, "a send retried on a fresh connection never ended"
        assert isinstance(outcomes[0], MailTransientError)
        assert [outcomes[number] for number in range(1, PIPELINE_DEPTH)] == [None, None]
        ids = pipelining_server.message_ids()
        assert all(ids[f"<pipe-{number}@nproxy.localhost>"] == 1 for number in (1, 2))

    @pytest.mark.parametrize(
        "script",
        [
            ("drop", "data_end"),
            ("end", b"421 4.3.2 closing"),
            ("end", b"not SMTP"),
            ("rcpt", b"421 4.3.2 closing"),
            ("rset", b"500 5.5.1 no"),
            ("data", b"354 go ahead anyway"),
        ],
        ids=repr,
    )
    async def test_every_send_ends_when_a_full_pipeline_fails(
        self, pipelining_server: RawSmtpServer, script: tuple[str, object]
    ) -> None:
        """A connection failing with a full pipeline: every send ends, and none that succeeded
        was left undelivered."""
        kind, what = script
        if kind == "drop":
            pipelining_server.drop_at("data_end")
        elif kind == "end":
            pipelining_server.answer_data_end(REFUSED, what)  # type: ignore[arg-type]
        elif kind == "rcpt":
            pipelining_server.answer_rcpt(REFUSED, what)  # type: ignore[arg-type]
        else:
            pipelining_server.answer_rcpt(REFUSED, b"550 5.1.1 no such user")
            if kind == "rset":
                pipelining_server.answer_rset(what)  # type: ignore[arg-type]
            else:
                pipelining_server.answer_data_without_recipient(what)  # type: ignore[arg-type]
        transport = transport_for(pipelining_server, max_connections=1)
        mails = [(REFUSED if number == 1 else GOOD, number) for number in range(9)]

        with anyio.move_on_after(10) as scope:
            outcomes = await send_all(transport, mails, senders=PIPELINE_DEPTH)
        await transport.aclose()

        assert not scope.cancelled_caught, "a send retried on a fresh connection never ended"
        delivered = pipelining_server.message_ids()
        assert all(
            delivered[f"<pipe-{number}@nproxy.localhost>"] >= 1
            for number, outcome in outcomes.items()
            if outcome is None
        )
        failed = [number for number, outcome in sorted(outcomes.items()) if outcome is not None]
        assert failed == ([0] if kind == "drop" else [1])  # a drop: at the first end of data
