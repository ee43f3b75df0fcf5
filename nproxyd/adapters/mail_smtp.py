"""SMTP mail transport over aiosmtplib, with a small pool of reused connections.

Every send borrows one connection exclusively: an idle one from the stack, or a new one while
fewer than ``max_connections`` exist. A connection goes back to the stack only when its state
is known to be clean; anything else (a timeout, a cancelled send, a failed reset) closes it.
Driver exceptions are translated in :meth:`SmtpTransport._translate` and nowhere else, into
three kinds: the server is unavailable (nothing was said about the message), it refused the
message for now, or for good. Every reply text is made storable there (a server may answer in
Latin-1, with a NUL, or at any length).

Recipients follow the one address rule (:func:`nproxyd.core.rules.address_problem`); a
non-ASCII domain travels as IDNA, a non-ASCII local part only with SMTPUTF8 when the server
offers it.
"""

from __future__ import annotations

import base64
import functools
import re
import socket
import ssl
from email.message import Message
from email.utils import parseaddr

import aiosmtplib
import anyio
from aiosmtplib.typing import SMTPStatus

from nproxyd.core.config import SmtpConfig, redact_text
from nproxyd.core.errors import (
    MailError,
    MailPermanentError,
    MailTransientError,
    MailUnavailableError,
)
from nproxyd.core.rules import address_problem, ascii_domain, needs_smtputf8
from nproxyd.core.text import storable

# Replies after which the server has answered and aiosmtplib has already sent RSET: the
# connection is reusable once a reset of our own confirms the envelope is clean.
_REPLY_ERRORS = (aiosmtplib.SMTPResponseException,)
# Refused before any command was sent (bad address, missing From): the connection is untouched.
_LOCAL_REFUSALS = (ValueError, aiosmtplib.SMTPNotSupported)
_SERVICE_CLOSING = 421
# 530-539: authentication or encryption refused (530 auth required, 535 bad credentials,
# 538 encryption required): the transport's configuration is wrong, not the message.
_AUTH_REPLIES = range(530, 540)
_NOT_OFFERED = "SMTPUTF8, which the server does not offer"
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


@functools.lru_cache(maxsize=64)
def _envelope_sender(from_header: str) -> str:
    address = parseaddr(from_header)[1]
    if not address:
        raise ValueError(f"no sender address in From: {from_header!r}")
    return _wire_address(address)


def _wire_address(address: str) -> str:
    """The address as it goes on the wire: its domain as IDNA when that is not ASCII."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{ascii_domain(domain) or domain}"


class _Progress:
    """How far one message got: after a recipient was accepted, a failure is about it."""

    recipient_accepted = False


def _envelope(message: Message) -> tuple[str, bytes]:
    """The envelope sender (from the From header) and the message as bytes."""
    from_header = message["From"]
    if from_header is None:
        raise ValueError("the message has no From header")
    return _envelope_sender(str(from_header)), message.as_bytes()


class SmtpTransport:
    """Delivers mail to one SMTP server; implements :class:`nproxyd.core.ports.MailTransport`."""

    def __init__(self, config: SmtpConfig, tls_context: ssl.SSLContext | None = None) -> None:
        self._config = config
        self._tls_context = tls_context
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = anyio.Semaphore(config.max_connections)
        self._connections_opened = 0
        self._local_hostname: str | None = None
        self._closed = False
        self._secrets = _secret_forms(config.username, config.password)

    @property
    def connections_opened(self) -> int:
        """How many SMTP connections this transport has opened so far."""
        return self._connections_opened

    async def send(self, message: Message, recipient: str) -> None:
        """Deliver ``message`` to ``recipient``; raises a :class:`MailError` subclass."""
        if self._closed:
            raise MailUnavailableError("SMTP transport is closed")
        problem = address_problem(recipient)
        if problem is not None:
            raise MailPermanentError(f"invalid recipient address: {problem}")
        async with self._slots:
            connection, reused = await self._checkout()
            progress = _Progress()
            try:
                await self._transmit(connection, message, recipient, progress)
            except Exception as exc:
                if not (reused and _dropped(exc)):
                    raise self._translate(exc, progress=progress) from None
            else:
                return
            # The server closed a pooled connection while it sat idle (idle timeout, restart).
            # Retrying once on a fresh connection keeps that from costing the message an
            # attempt; delivery is at-least-once and the Message-ID marks any duplicate.
            connection = await self._open()
            progress = _Progress()
            try:
                await self._transmit(connection, message, recipient, progress)
            except Exception as exc:
                raise self._translate(exc, progress=progress) from None

    async def aclose(self) -> None:
        """Refuse new sends and QUIT every idle connection."""
        self._closed = True
        idle, self._idle = self._idle, []
        async with anyio.create_task_group() as group:
            for connection in idle:
                group.start_soon(_quit, connection, name="smtp-quit")

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        while self._idle:
            connection = self._idle.pop()
            if connection.is_connected:
                return connection, True
            connection.close()
        return await self._open(), False

    async def _open(self) -> aiosmtplib.SMTP:
        config = self._config
        if self._local_hostname is None:
            self._local_hostname = await anyio.to_thread.run_sync(socket.getfqdn)
        connection = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            local_hostname=self._local_hostname,
            timeout=config.timeout_seconds,
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            tls_context=self._tls_context,
            username=config.username or None,
            password=config.password if config.username else None,
        )
        try:
            await connection.connect()  # closes itself on any failure
        except Exception as exc:
            raise self._translate(exc, progress=None) from None
        self._connections_opened += 1
        return connection

    async def _transmit(
        self, connection: aiosmtplib.SMTP, message: Message, recipient: str, progress: _Progress
    ) -> None:
        clean = False
        try:
            sender, data = _envelope(message)
            await _send_envelope(connection, sender, _wire_address(recipient), data, progress)
            clean = True
        except _REPLY_ERRORS as exc:
            # A garbled reply (code -1) leaves the stream out of step: never reuse it.
            clean = exc.code > 0 and await _reset(connection)
            raise
        except _LOCAL_REFUSALS:
            clean = True
            raise
        finally:
            self._checkin(connection, clean=clean)

    def _checkin(self, connection: aiosmtplib.SMTP, *, clean: bool) -> None:
        if clean and connection.is_connected and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()

    def _translate(self, exc: Exception, *, progress: _Progress | None) -> MailError:
        """The one place where SMTP driver errors become unavailable, transient or permanent.

        ``progress`` is None while connecting. Anything that goes wrong while connecting,
        upgrading to TLS or logging in, a 421, a 53x (authentication) or a dropped connection is
        about the server, not the message: :class:`MailUnavailableError`, which uses up none of
        the message's attempts, so an outage or a wrong password never kills queued mail.
        Only the server's answers about this message count: 4xx transient, 5xx permanent.
        """
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return self._reply_error(exc.code, exc.message, progress)
        if isinstance(exc, _LOCAL_REFUSALS) and progress is not None:
            return MailPermanentError(self._clean(f"SMTP refused the message locally: {exc}"))
        stage = "connect" if progress is None else "send"
        detail = self._clean(f"SMTP {stage} failed: {_describe(exc)}")
        accepted = progress is not None and progress.recipient_accepted
        if isinstance(exc, aiosmtplib.SMTPTimeoutError) and accepted:
            return MailTransientError(detail)  # the server went quiet on this very message
        return MailUnavailableError(detail)

    def _reply_error(self, code: int, text: str, progress: _Progress | None) -> MailError:
        where = f"{self._config.host}:{self._config.port}"
        detail = self._clean(f"SMTP {code} from {where}: {_undecodable_as_one(text)}")
        if progress is None or code == _SERVICE_CLOSING or code in _AUTH_REPLIES:
            return MailUnavailableError(detail)
        if code >= 500:
            return MailPermanentError(detail)
        return MailTransientError(detail)

    def _clean(self, text: str) -> str:
        """Secret-free and storable: redact first, so a cut never leaves half a secret."""
        return storable(redact_text(text, self._secrets))


async def _send_envelope(
    connection: aiosmtplib.SMTP, sender: str, recipient: str, data: bytes, progress: _Progress
) -> None:
    """MAIL, RCPT and DATA for one recipient, on addresses already checked.

    aiosmtplib's sendmail/send_message re-parse both addresses with ``email.utils`` on every
    message (and send_message re-folds every header): that cost more than the SMTP exchange.
    """
    if connection.is_ehlo_or_helo_needed:
        await connection.ehlo()
    options: list[bytes] = []
    needing = _needs_smtputf8(sender, recipient, data)
    if needing is not None:
        if not connection.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported(f"{needing} {_NOT_OFFERED}")
        options.append(b"SMTPUTF8")
    mail = await connection.execute_command(b"MAIL", b"FROM:<" + sender.encode() + b">", *options)
    if mail.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
    rcpt = await connection.execute_command(b"RCPT", b"TO:<" + recipient.encode() + b">")
    if rcpt.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
        raise aiosmtplib.SMTPRecipientRefused(rcpt.code, rcpt.message, recipient)
    progress.recipient_accepted = True
    await connection.data(data)


def _needs_smtputf8(sender: str, recipient: str, data: bytes) -> str | None:
    """What needs SMTPUTF8 (a non-ASCII local part, or UTF-8 in a header), or None."""
    if needs_smtputf8(recipient):
        return "recipient needs"
    if needs_smtputf8(sender):
        return "sender needs"
    end = _END_OF_HEADERS.search(data)
    if not data[: end.start() if end else len(data)].isascii():
        return "message headers need"
    return None


def _undecodable_as_one(text: str) -> str:
    """A reply aiosmtplib decoded with ``surrogateescape``, cleaned from its original bytes.

    Each undecodable byte becomes one U+FFFD (and the text is marked), rather than the three
    its escaped surrogate would become.
    """
    try:
        return storable(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return storable(text)  # a surrogate that did not come from a byte


def _dropped(exc: Exception) -> bool:
    """The server went away under a connection (not a reply about this message)."""
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return True
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == _SERVICE_CLOSING


async def _reset(connection: aiosmtplib.SMTP) -> bool:
    """RSET after a refusal; aiosmtplib's own RSET swallows failures, so confirm it here."""
    if not connection.is_connected:
        return False
    try:
        await connection.rset()
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


async def _quit(connection: aiosmtplib.SMTP) -> None:
    try:
        await connection.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        connection.close()


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _secret_forms(username: str, password: str) -> list[str]:
    """The password as it may be echoed: raw, and as AUTH LOGIN / AUTH PLAIN send it."""
    if not password:
        return []
    plain = f"\0{username}\0{password}".encode()
    return [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(plain).decode(),
    ]
