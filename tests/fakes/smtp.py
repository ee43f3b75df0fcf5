"""A real SMTP server on 127.0.0.1 for tests (aiosmtpd in its own thread).

It records what it receives, counts client sessions, and can misbehave on request: refuse a
recipient, answer 451 for the next messages, hold every message for a while before accepting
it (a slow server), require AUTH, speak STARTTLS or implicit TLS with a throwaway CA from
trustme, and go down and come back on the same port. It is a plain class
(``start()``/``stop()``) so system tests of the real daemon can use it too.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

TlsMode = Literal["none", "starttls", "tls"]


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server accepted it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    tls: bool
    login: str | None
    helo: str | None = None  # the name the client gave after EHLO (or HELO)

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def headers(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.message.items()}


class _Handler:
    """aiosmtpd handler hooks; every decision reads the owning server's current settings."""

    def __init__(self, owner: FakeSmtpServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        self._owner._count_session(server)
        session.host_name = hostname
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        self._owner._count_session(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        closing = self._owner._take(self._owner._mail_failures)
        if closing is not None:
            # Reply first, then hang up: what a server does on an idle timeout or shutdown.
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return closing
        if self._owner._requires_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        refusal = self._owner._refusal_for(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        failure = self._owner._take(self._owner._data_failures)
        if failure is not None:
            return failure
        delay = self._owner._data_delay_seconds
        if delay > 0:
            await asyncio.sleep(delay)
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        auth_data = session.auth_data
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None
        raw = envelope.original_content or envelope.content or b""
        self._owner._record(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=raw if isinstance(raw, bytes) else raw.encode(),
                tls=tls,
                login=login,
                helo=session.host_name,
            )
        )
        return "250 2.0.0 Message accepted"


class FakeSmtpServer:
    """A real SMTP server for tests; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsMode = "none",
        username: str | None = None,
        password: str | None = None,
        data_delay_seconds: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.tls: TlsMode = tls
        self._credentials = (username, password) if username is not None else None
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._connections = 0
        self._refusals: dict[str, str] = {}
        self._data_failures: list[str] = []
        self._mail_failures: list[str] = []
        self._data_delay_seconds = data_delay_seconds
        self._controller: Controller | None = None
        self._ca = trustme.CA() if tls != "none" else None
        self._server_tls = self._make_server_tls()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeSmtpServer:
        """Listen on ``host:port`` (the same port on every start)."""
        assert self._controller is None, "already running"
        controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname="fake-smtp.localhost",
            ready_timeout=5.0,
            **self._smtp_options(),
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        """Close every client connection and stop listening, like a server going down."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._drop_sessions(), controller.loop)
        future.result(timeout=5.0)
        controller.stop()

    def __enter__(self) -> FakeSmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def _requires_auth(self) -> bool:
        return self._credentials is not None

    @property
    def running(self) -> bool:
        return self._controller is not None

    # -- what was received -----------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of every accepted message, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """Client sessions that greeted the server (EHLO/HELO) since construction."""
        with self._lock:
            return self._connections

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived; raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._messages)} of {count} messages arrived")
                self._lock.wait(remaining)
            return list(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    # -- misbehaviour ----------------------------------------------------------------------

    def reject_recipient(self, address: str, reply: str = "550 5.1.1 No such user here") -> None:
        """Answer RCPT TO for ``address`` with ``reply`` from now on."""
        with self._lock:
            self._refusals[address.lower()] = reply

    def fail_next(self, count: int, reply: str = "451 4.3.0 Try again later") -> None:
        """Answer the end of DATA with ``reply`` for the next ``count`` messages."""
        with self._lock:
            self._data_failures.extend([reply] * count)

    def hang_up_on_next_mail(
        self, count: int = 1, reply: str = "421 4.4.2 Idle timeout, closing connection"
    ) -> None:
        """Answer MAIL FROM with ``reply`` and close the connection, ``count`` times."""
        with self._lock:
            self._mail_failures.extend([reply] * count)

    def slow_down(self, seconds: float) -> None:
        """Hold every message ``seconds`` before accepting it at the end of DATA (0: no delay).

        Sessions wait concurrently, so a client with several connections is slowed per message,
        not serialised.
        """
        with self._lock:
            self._data_delay_seconds = seconds

    def client_tls_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate (and checks the host)."""
        assert self._ca is not None, "server runs without TLS"
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._ca.configure_trust(context)
        return context

    # -- called from the server thread -----------------------------------------------------

    def _count_session(self, server: SMTP) -> None:
        # A STARTTLS session greets twice on one connection; count the connection once.
        with self._lock:
            if server not in self._sessions:
                self._sessions.add(server)
                self._connections += 1

    def _refusal_for(self, address: str) -> str | None:
        with self._lock:
            return self._refusals.get(address.lower())

    def _take(self, queue: list[str]) -> str | None:
        with self._lock:
            return queue.pop(0) if queue else None

    def _record(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        expected = self._credentials
        if expected is None or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        given = (data.login.decode(), data.password.decode())
        return AuthResult(success=given == expected, handled=False, auth_data=data)

    async def _drop_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for server in sessions:
            if server.transport is not None:
                server.transport.close()
        await asyncio.sleep(0)

    # -- configuration ---------------------------------------------------------------------

    def _make_server_tls(self) -> ssl.SSLContext | None:
        if self._ca is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert(self.host, "localhost").configure_cert(context)
        return context

    def _smtp_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.tls == "tls":
            options["ssl_context"] = self._server_tls
        elif self.tls == "starttls":
            options["tls_context"] = self._server_tls
            options["require_starttls"] = True
        if self._credentials is not None:
            # AUTH is demanded at MAIL FROM (handle_MAIL) rather than with aiosmtpd's
            # auth_required, which warns on every session when TLS is not required too.
            # Implicit TLS is not STARTTLS to aiosmtpd, so only STARTTLS can insist on it.
            options["authenticator"] = self._authenticate
            options["auth_require_tls"] = self.tls == "starttls"
        return options


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
