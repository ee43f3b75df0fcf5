"""SmtpTransport against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid

import anyio
import pytest
import trustme

from nproxyd.adapters.mail_smtp import SmtpTransport
from nproxyd.core.config import SmtpConfig
from nproxyd.core.errors import MailPermanentError, MailTransientError, MailUnavailableError
from tests.fakes.smtp import FakeSmtpServer

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-Pa55word"
TIMEOUT = 2.0


def compose(to: str = "alice@example.test", subject: str = "Hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "nproxy billing <billing@nproxy.localhost>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="nproxy.localhost")
    message.set_content(f"Body of {subject}.\nSecond line.\n")
    return message


def config_for(server: FakeSmtpServer, **overrides: object) -> SmtpConfig:
    values: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "security": server.tls,
        "timeout_seconds": TIMEOUT,
        "max_connections": 2,
    }
    values.update(overrides)
    return SmtpConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer() as running:
        yield running


class TestDelivery:
    async def test_message_arrives_intact(self, server: FakeSmtpServer) -> None:
        """Subject, body, Message-ID and envelope arrive as sent."""
        transport = SmtpTransport(config_for(server))
        message = compose(subject="Your nproxy subscription renewal invoice")
        await transport.send(message, "alice@example.test")
        await transport.aclose()

        [received] = server.messages
        assert received.mail_from == "billing@nproxy.localhost"
        assert received.rcpt_tos == ("alice@example.test",)
        parsed = received.message
        assert parsed["Subject"] == "Your nproxy subscription renewal invoice"
        assert parsed["Message-ID"] == message["Message-ID"]
        # SMTP carries CRLF line ends; the text itself is unchanged.
        assert parsed.get_content().splitlines() == message.get_content().splitlines()

    async def test_envelope_recipient_is_the_argument(self, server: FakeSmtpServer) -> None:
        """The recipient argument, not the To header, decides where the mail goes."""
        transport = SmtpTransport(config_for(server))
        await transport.send(compose(to="header@example.test"), "envelope@example.test")
        await transport.aclose()

        assert server.messages[0].rcpt_tos == ("envelope@example.test",)

    async def test_concurrent_sends_reuse_a_bounded_pool(self, server: FakeSmtpServer) -> None:
        """50 concurrent sends with max_connections=3 use at most 3 connections."""
        transport = SmtpTransport(config_for(server, max_connections=3))
        async with anyio.create_task_group() as group:
            for index in range(50):
                group.start_soon(transport.send, compose(subject=f"m{index}"), "a@example.test")
        await transport.aclose()

        subjects = {received.message["Subject"] for received in server.messages}
        assert subjects == {f"m{index}" for index in range(50)}
        assert 1 <= server.connections <= 3
        assert transport.connections_opened == server.connections

    async def test_sequential_sends_use_one_connection(self, server: FakeSmtpServer) -> None:
        """Messages sent one after another share a single connection."""
        transport = SmtpTransport(config_for(server, max_connections=4))
        for index in range(5):
            await transport.send(compose(subject=f"s{index}"), "a@example.test")
        await transport.aclose()

        assert len(server.messages) == 5
        assert server.connections == 1

    async def test_closed_transport_refuses_sends(self, server: FakeSmtpServer) -> None:
        """After aclose() a send is refused as transient and nothing is delivered."""
        transport = SmtpTransport(config_for(server))
        await transport.aclose()

        with pytest.raises(MailTransientError):
            await transport.send(compose(), "a@example.test")
        assert server.messages == []


class TestHeloName:
    async def test_the_configured_name_follows_ehlo(self, server: FakeSmtpServer) -> None:
        """email.smtp.helo_name is the name the server hears after EHLO."""
        transport = SmtpTransport(config_for(server, helo_name="mail.nproxy.example"))
        await transport.send(compose(), "a@example.test")
        await transport.aclose()

        assert server.messages[0].helo == "mail.nproxy.example"

    async def test_without_one_the_host_gives_its_own_name(self, server: FakeSmtpServer) -> None:
        """An empty helo_name gives the host's fully qualified name, as looked up here."""
        transport = SmtpTransport(config_for(server))
        await transport.send(compose(), "a@example.test")
        await transport.aclose()

        assert server.messages[0].helo == await anyio.to_thread.run_sync(socket.getfqdn)


class TestTls:
    async def test_starttls(self) -> None:
        """STARTTLS upgrades the session with a certificate the client verifies."""
        with FakeSmtpServer(tls="starttls") as server:
            transport = SmtpTransport(config_for(server), server.client_tls_context())
            await transport.send(compose(), "a@example.test")
            await transport.aclose()

        [received] = server.messages
        assert received.tls

    async def test_implicit_tls(self) -> None:
        """Implicit TLS (security = tls) delivers over an encrypted connection."""
        with FakeSmtpServer(tls="tls") as server:
            transport = SmtpTransport(config_for(server), server.client_tls_context())
            await transport.send(compose(), "a@example.test")
            await transport.aclose()

        [received] = server.messages
        assert received.tls

    async def test_untrusted_certificate_is_transient(self) -> None:
        """A certificate the client does not trust fails as a transient error."""
        with FakeSmtpServer(tls="tls") as server:
            untrusting = ssl.create_default_context()
            untrusting.load_verify_locations(cadata=_unrelated_ca_pem())
            transport = SmtpTransport(config_for(server), untrusting)
            with pytest.raises(MailTransientError):
                await transport.send(compose(), "a@example.test")
            await transport.aclose()

        assert server.messages == []


class TestAuth:
    async def test_login_succeeds(self) -> None:
        """With a username set the transport logs in and the server accepts the mail."""
        with FakeSmtpServer(username="billing", password=PASSWORD) as server:
            config = config_for(server, username="billing", password=PASSWORD)
            transport = SmtpTransport(config)
            await transport.send(compose(), "a@example.test")
            await transport.aclose()

        assert server.messages[0].login == "billing"

    async def test_login_over_starttls(self) -> None:
        """AUTH after STARTTLS works when the server only allows it under TLS."""
        with FakeSmtpServer(tls="starttls", username="billing", password=PASSWORD) as server:
            config = config_for(server, username="billing", password=PASSWORD)
            transport = SmtpTransport(config, server.client_tls_context())
            await transport.send(compose(), "a@example.test")
            await transport.aclose()

        assert server.messages[0].login == "billing"
        assert server.messages[0].tls

    async def test_wrong_password_is_unavailable_and_secret_free(self) -> None:
        """535 on AUTH is "unavailable", names the code and never shows the password."""
        # 535 is a fault of the transport's configuration, not of the message: permanent would
        # mark every queued mail dead until an operator retried them all. Unavailable keeps
        # them queued while the password is fixed, without using up their attempts.
        with FakeSmtpServer(username="billing", password="the-right-one") as server:
            config = config_for(server, username="billing", password=PASSWORD)
            transport = SmtpTransport(config)
            with pytest.raises(MailUnavailableError) as caught:
                await transport.send(compose(), "a@example.test")
            await transport.aclose()

        text = str(caught.value)
        assert "535" in text
        assert PASSWORD not in text
        assert PASSWORD not in repr(caught.value)
        assert caught.value.__cause__ is None
        assert server.messages == []

    async def test_missing_login_is_unavailable(self) -> None:
        """A server that requires AUTH refuses an anonymous sender; the server is unavailable."""
        with FakeSmtpServer(username="billing", password=PASSWORD) as server:
            transport = SmtpTransport(config_for(server))
            with pytest.raises(MailUnavailableError, match="530"):
                await transport.send(compose(), "a@example.test")
            await transport.aclose()


class TestRefusals:
    async def test_unknown_user_is_permanent_and_connection_survives(
        self, server: FakeSmtpServer
    ) -> None:
        """550 for one recipient is permanent; the next message reuses the connection."""
        server.reject_recipient("ghost@example.test")
        transport = SmtpTransport(config_for(server, max_connections=1))

        with pytest.raises(MailPermanentError) as caught:
            await transport.send(compose(to="ghost@example.test"), "ghost@example.test")
        await transport.send(compose(subject="after"), "alice@example.test")
        await transport.aclose()

        assert "550" in str(caught.value)
        assert "No such user" in str(caught.value)
        [received] = server.messages
        assert received.message["Subject"] == "after"
        assert received.rcpt_tos == ("alice@example.test",)
        assert server.connections == 1

    async def test_bad_address_reply_is_permanent(self, server: FakeSmtpServer) -> None:
        """553 (mailbox name not allowed) for the recipient is permanent."""
        server.reject_recipient("bad@example.test", "553 5.1.3 Error: malformed address")
        transport = SmtpTransport(config_for(server))
        with pytest.raises(MailPermanentError, match="553"):
            await transport.send(compose(), "bad@example.test")
        await transport.aclose()

    @pytest.mark.parametrize(
        "recipient",
        [
            "a@example.test\r\nRCPT TO:<b@example.test>",
            "Bob <b@example.test>",
            "not an address",
            "no-at-sign",
            "",
        ],
    )
    async def test_invalid_address_is_permanent(
        self, server: FakeSmtpServer, recipient: str
    ) -> None:
        """A recipient that is not a bare address is refused and nothing is sent anywhere."""
        transport = SmtpTransport(config_for(server))
        with pytest.raises(MailPermanentError, match="invalid recipient"):
            await transport.send(compose(), recipient)
        await transport.send(compose(), "a@example.test")
        await transport.aclose()

        assert [received.rcpt_tos for received in server.messages] == [("a@example.test",)]

    async def test_451_is_transient_then_delivers(self, server: FakeSmtpServer) -> None:
        """451 at end of data is transient; the next attempt is delivered."""
        server.fail_next(1)
        transport = SmtpTransport(config_for(server))
        message = compose()

        with pytest.raises(MailTransientError, match="451"):
            await transport.send(message, "a@example.test")
        await transport.send(message, "a@example.test")
        await transport.aclose()

        assert len(server.messages) == 1

    async def test_permanent_data_refusal(self, server: FakeSmtpServer) -> None:
        """554 at end of data is permanent."""
        server.fail_next(1, "554 5.6.0 Message rejected")
        transport = SmtpTransport(config_for(server))
        with pytest.raises(MailPermanentError, match="554"):
            await transport.send(compose(), "a@example.test")
        await transport.aclose()


class TestOutages:
    async def test_server_down_is_transient(self) -> None:
        """Nothing listening on the port is a transient error."""
        config = SmtpConfig(port=_closed_port(), timeout_seconds=TIMEOUT)
        transport = SmtpTransport(config)
        with pytest.raises(MailTransientError, match="connect"):
            await transport.send(compose(), "a@example.test")
        await transport.aclose()
        assert transport.connections_opened == 0

    # pause None: the client usually has not read the EOF yet, so the send fails on the stale
    # connection and is retried; 0.2 s: the pool already sees it closed and skips it.
    @pytest.mark.parametrize("pause", [None, 0.2])
    async def test_reconnects_after_server_restart(
        self, server: FakeSmtpServer, pause: float | None
    ) -> None:
        """A pooled connection lost in a server restart is replaced and the send succeeds."""
        transport = SmtpTransport(config_for(server, max_connections=1))
        await transport.send(compose(subject="before"), "a@example.test")
        server.stop()
        server.start()
        if pause is not None:
            await anyio.sleep(pause)
        await transport.send(compose(subject="after"), "a@example.test")
        await transport.aclose()

        assert [m.message["Subject"] for m in server.messages] == ["before", "after"]
        assert transport.connections_opened == 2

    async def test_pooled_connection_hung_up_is_retried_once(self, server: FakeSmtpServer) -> None:
        """421 and hang-up on a pooled connection: the send is retried on a fresh one."""
        transport = SmtpTransport(config_for(server, max_connections=1))
        await transport.send(compose(subject="first"), "a@example.test")
        server.hang_up_on_next_mail()
        await transport.send(compose(subject="second"), "a@example.test")
        await transport.aclose()

        assert [m.message["Subject"] for m in server.messages] == ["first", "second"]
        assert transport.connections_opened == 2

    async def test_fresh_connection_hung_up_is_transient(self, server: FakeSmtpServer) -> None:
        """421 on a brand-new connection is not retried: it is a transient error."""
        transport = SmtpTransport(config_for(server))
        server.hang_up_on_next_mail(2)
        with pytest.raises(MailTransientError, match="421"):
            await transport.send(compose(), "a@example.test")
        await transport.aclose()

        assert transport.connections_opened == 1
        assert server.messages == []

    async def test_down_then_up_again(self, server: FakeSmtpServer) -> None:
        """Sends fail as transient while the server is down and succeed once it is back."""
        transport = SmtpTransport(config_for(server))
        await transport.send(compose(subject="first"), "a@example.test")
        server.stop()
        with pytest.raises(MailTransientError):
            await transport.send(compose(subject="lost"), "a@example.test")
        server.start()
        await transport.send(compose(subject="second"), "a@example.test")
        await transport.aclose()

        assert [m.message["Subject"] for m in server.messages] == ["first", "second"]

    async def test_connect_error_hides_password(self) -> None:
        """A connect failure with credentials configured never shows the password."""
        config = SmtpConfig(
            port=_closed_port(), username="billing", password=PASSWORD, timeout_seconds=TIMEOUT
        )
        transport = SmtpTransport(config)
        with pytest.raises(MailTransientError) as caught:
            await transport.send(compose(), "a@example.test")
        await transport.aclose()

        assert PASSWORD not in str(caught.value)
        assert caught.value.__cause__ is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _unrelated_ca_pem() -> str:
    pem: bytes = trustme.CA().cert_pem.bytes()
    return pem.decode()
