"""SMTP mail transport with a small pool of reused, pipelined connections.

aiosmtplib opens each connection (TCP, TLS or STARTTLS, AUTH, EHLO); the messages then go
through :class:`nproxyd.adapters.smtp_client.Pipe` on the same transport. When the server offers
RFC 2920 PIPELINING, a send submits its whole message to the pipe and lends the connection on
at once (up to ``PIPELINE_DEPTH`` messages in flight per connection): MAIL, RCPT and DATA go in
one write, and the pipe writes the body and its "." from its reply handler when DATA's 354
comes, in the same write as the next message's envelope; the send wakes once, when its message
is answered. Without PIPELINING every command waits for its reply (lock-step) and a connection
serves one send at a time.

Every send borrows a connection: an idle one from the stack, or a new one while fewer than
``max_connections`` exist (without any lock or checkpoint when one is idle). A connection goes
back to the stack only when its state is known to be clean; anything else (a timeout, a
cancelled send, a failed reset) closes it. Driver exceptions are translated in
:meth:`SmtpTransport._translate` and nowhere else, into three kinds: the server is unavailable
(nothing was said about the message), it refused the message for now, or for good. Every reply
text is made storable there from its raw bytes (a server may answer in Latin-1, with a NUL, or
at any length).

Recipients follow the one address rule (:func:`nproxyd.core.rules.address_problem`); a
non-ASCII domain travels as IDNA, a non-ASCII local part only with SMTPUTF8 when the server
offers it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import socket
import ssl
from collections import deque
from email.message import Message
from email.utils import parseaddr

import aiosmtplib
import anyio

from nproxyd.adapters.smtp_client import (
    DATA_OK,
    MAIL_OK,
    RCPT_OK,
    Dropped,
    Pipe,
    Reply,
    ReplyError,
    ReplyTimeout,
    command,
    data_block,
)
from nproxyd.core.config import SmtpConfig, redact_text
from nproxyd.core.errors import (
    MailError,
    MailPermanentError,
    MailTransientError,
    MailUnavailableError,
)
from nproxyd.core.rules import address_problem, ascii_domain, needs_smtputf8
from nproxyd.core.text import storable

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


# Messages in flight on one pipelining connection: one whose envelope is answered, one whose
# body is, one waiting with the next envelope, so that every body shares its write.
PIPELINE_DEPTH = 3


class _Connection:
    """One open connection: its pipe, what its server offers, and its messages in flight."""

    __slots__ = ("discarded", "full", "inflight", "pipe", "pipelining", "smtputf8")

    def __init__(self, pipe: Pipe, *, pipelining: bool, smtputf8: bool) -> None:
        self.pipe = pipe
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.inflight = 0  # messages submitted and not yet answered (pipelining only)
        self.full = False  # PIPELINE_DEPTH in flight: out of the idle stack until one is done
        self.discarded = False


# What each reply of the envelope group must be; anything else is the server's refusal.
_ENVELOPE = ("mail", "rcpt", "data")
_WANTED = {"mail": (MAIL_OK,), "rcpt": RCPT_OK, "data": (DATA_OK,)}


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
        self._idle: list[_Connection] = []
        self._open_count = 0  # connections open or being opened (idle or lent out)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._connect_failed: MailError | None = None  # the last connect's failure
        self._connections_opened = 0
        self._local_hostname: str | None = config.helo_name or None  # None: not looked up yet
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
        connection, reused = await self._checkout(fresh=False)
        progress = _Progress()
        try:
            await self._transmit(connection, message, recipient, progress)
        except Exception as exc:
            if not (reused and _dropped(exc)):
                raise self._translate(exc, progress=progress) from None
        else:
            return
        # The server closed a pooled connection while it sat idle (idle timeout, restart), or
        # it failed on the message pipelined ahead of this one. Retrying once on a fresh
        # connection keeps that from costing the message an attempt; delivery is
        # at-least-once and the Message-ID marks any duplicate.
        connection, _ = await self._checkout(fresh=True)
        progress = _Progress()
        try:
            await self._transmit(connection, message, recipient, progress)
        except Exception as exc:
            raise self._translate(exc, progress=progress) from None

    async def aclose(self) -> None:
        """Refuse new sends and QUIT every idle connection."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open_count -= len(idle)
        async with anyio.create_task_group() as group:
            for connection in idle:
                group.start_soon(connection.pipe.quit, name="smtp-quit")
        self._wake_all()  # every waiting send learns that the transport is closed

    # -- the pool --------------------------------------------------------------------------

    async def _checkout(self, *, fresh: bool) -> tuple[_Connection, bool]:
        """An idle connection (reused: True), else a new one, else wait for a check-in."""
        while True:
            if self._closed:
                raise MailUnavailableError("SMTP transport is closed")
            while self._idle and not fresh:
                connection = self._idle.pop()
                if connection.pipe.usable:
                    return connection, True
                self._discard(connection)
            if fresh and self._open_count >= self._config.max_connections:
                self._make_room()
            if self._open_count < self._config.max_connections:
                self._open_count += 1
                try:
                    return await self._open(), False
                except BaseException:
                    self._release()
                    raise
            failed = self._connect_failed
            await self._wait()
            if self._connect_failed is not failed and self._connect_failed is not None:
                # A connect failed while this send waited: the server is unavailable for it
                # too, and it does not ask again (one connect per connection slot at most).
                raise MailUnavailableError(self._connect_failed.message)

    def _make_room(self) -> None:
        """Close the oldest idle connection with nothing in flight, for a fresh one."""
        for index, connection in enumerate(self._idle):
            if not connection.inflight:
                del self._idle[index]
                self._discard(connection)
                return

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, then cancelled: hand the wake-up on
            raise
        finally:
            if not waiter.done():
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            self._wake()

    def _checkin(self, connection: _Connection, *, clean: bool) -> None:
        if clean and connection.pipe.usable and not self._closed:
            self._idle.append(connection)
            self._wake()
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        if connection.discarded:  # its other messages in flight learn it too: once is enough
            return
        connection.discarded = True
        connection.pipe.close()
        self._release()

    def _release(self) -> None:
        self._open_count -= 1
        self._wake()

    async def _helo_name(self) -> str:
        """``email.smtp.helo_name``, else the host's fully qualified name, looked up once.

        The lookup may ask DNS, which can hang: past ``timeout_seconds`` it is abandoned (its
        thread finishes on its own) and the plain host name is used, so a resolver that does
        not answer never stalls the mail tick.
        """
        if self._local_hostname is None:
            with anyio.move_on_after(self._config.timeout_seconds):
                self._local_hostname = await anyio.to_thread.run_sync(
                    socket.getfqdn, abandon_on_cancel=True
                )
            if self._local_hostname is None:
                self._local_hostname = socket.gethostname()
        return self._local_hostname

    async def _open(self) -> _Connection:
        config = self._config
        connection = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            local_hostname=await self._helo_name(),
            timeout=config.timeout_seconds,
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            tls_context=self._tls_context,
            username=config.username or None,
            password=config.password if config.username else None,
        )
        try:
            await connection.connect()  # closes itself on any failure
            if connection.is_ehlo_or_helo_needed:
                await connection.ehlo()
        except Exception as exc:
            connection.close()
            self._connect_failed = self._translate(exc, progress=None)
            self._wake_all()  # every waiting send learns of it
            raise self._connect_failed from None
        transport = connection.transport
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - aiosmtplib's
            connection.close()
            raise MailUnavailableError("SMTP connect failed: no transport")
        self._connections_opened += 1
        return _Connection(
            Pipe(transport, config.timeout_seconds),
            pipelining=connection.supports_extension("pipelining"),
            smtputf8=connection.supports_extension("smtputf8"),
        )

    # -- one message -----------------------------------------------------------------------

    async def _transmit(
        self, connection: _Connection, message: Message, recipient: str, progress: _Progress
    ) -> None:
        try:
            envelope, block = _prepare(connection, message, recipient)
        except _LOCAL_REFUSALS:
            self._checkin(connection, clean=True)  # nothing was sent
            raise
        if connection.pipelining:
            await self._pipelined(connection, envelope, block, progress)
            return
        clean = False
        pipe = connection.pipe
        try:
            await _send_envelope(connection, envelope, progress)
            final: list[Reply] = []
            await pipe.wait(pipe.expect(block, 1, final))
            _accepted(final[0])
            clean = True
        except ReplyError as exc:
            # A garbled reply (code -1) leaves the stream out of step: never reuse it.
            clean = exc.resettable and exc.reply.code > 0 and await _reset(pipe)
            raise
        finally:
            self._checkin(connection, clean=clean)

    async def _pipelined(
        self, connection: _Connection, envelope: bytes, block: bytes, progress: _Progress
    ) -> None:
        """Submit the message to the pipe, which drives it from its replies (the body after
        354, or RSET after a refusal); the connection serves further sends meanwhile, up to
        ``PIPELINE_DEPTH`` in flight. Wakes once, when the message is answered."""
        pipe = connection.pipe
        replies: list[Reply] = []
        future = pipe.submit(envelope, block, replies)
        connection.inflight += 1
        if connection.inflight < PIPELINE_DEPTH:
            self._checkin(connection, clean=True)
        else:
            connection.full = True
        try:
            await pipe.wait(future)
        except (Dropped, ReplyTimeout, ReplyError):
            _judge(replies[:3], _ENVELOPE, progress)
            raise
        finally:
            connection.inflight -= 1
            if connection.full or not pipe.usable:  # back in the stack, or its slot freed
                connection.full = False
                if connection in self._idle:
                    self._idle.remove(connection)
                self._checkin(connection, clean=True)
            elif not connection.inflight:
                self._wake()  # a send waiting to make room for a fresh connection may close it
        _judge(replies[:3], _ENVELOPE, progress)
        _accepted(replies[3])

    def _translate(self, exc: Exception, *, progress: _Progress | None) -> MailError:
        """The one place where SMTP driver errors become unavailable, transient or permanent.

        ``progress`` is None while connecting. Anything that goes wrong while connecting,
        upgrading to TLS or logging in, a 421, a 53x (authentication) or a dropped connection is
        about the server, not the message: :class:`MailUnavailableError`, which uses up none of
        the message's attempts, so an outage or a wrong password never kills queued mail.
        Only the server's answers about this message count: 4xx transient, 5xx permanent.
        """
        if isinstance(exc, ReplyError):
            return self._reply_error(exc.reply.code, storable(exc.reply.text), progress)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return self._reply_error(exc.code, _undecodable_as_one(exc.message), progress)
        if isinstance(exc, _LOCAL_REFUSALS) and progress is not None:
            return MailPermanentError(self._clean(f"SMTP refused the message locally: {exc}"))
        stage = "connect" if progress is None else "send"
        detail = self._clean(f"SMTP {stage} failed: {_describe(exc)}")
        accepted = progress is not None and progress.recipient_accepted
        if isinstance(exc, aiosmtplib.SMTPTimeoutError | ReplyTimeout) and accepted:
            return MailTransientError(detail)  # the server went quiet on this very message
        return MailUnavailableError(detail)

    def _reply_error(self, code: int, text: str, progress: _Progress | None) -> MailError:
        where = f"{self._config.host}:{self._config.port}"
        detail = self._clean(f"SMTP {code} from {where}: {text}")
        if progress is None or code == _SERVICE_CLOSING or code in _AUTH_REPLIES:
            return MailUnavailableError(detail)
        if code >= 500:
            return MailPermanentError(detail)
        return MailTransientError(detail)

    def _clean(self, text: str) -> str:
        """Secret-free and storable: redact first, so a cut never leaves half a secret."""
        return storable(redact_text(text, self._secrets))


def _prepare(connection: _Connection, message: Message, recipient: str) -> tuple[bytes, bytes]:
    """The ``MAIL`` and ``RCPT`` lines and the DATA block of one message; refused locally
    (``ValueError``, ``SMTPNotSupported``) before anything is sent.

    aiosmtplib's sendmail/send_message re-parse both addresses with ``email.utils`` on every
    message (and send_message re-folds every header): that cost more than the SMTP exchange.
    """
    sender, data = _envelope(message)
    recipient = _wire_address(recipient)
    options: tuple[bytes, ...] = ()
    needing = _needs_smtputf8(sender, recipient, data)
    if needing is not None:
        if not connection.smtputf8:
            raise aiosmtplib.SMTPNotSupported(f"{needing} {_NOT_OFFERED}")
        options = (b"SMTPUTF8",)
    mail = command(b"MAIL", b"FROM:<" + sender.encode() + b">", *options)
    rcpt = command(b"RCPT", b"TO:<" + recipient.encode() + b">")
    return mail + rcpt + b"DATA\r\n", data_block(data)


async def _send_envelope(connection: _Connection, envelope: bytes, progress: _Progress) -> None:
    """MAIL, RCPT and DATA: in one write when pipelining, else command by command."""
    if connection.pipelining:
        await _group(connection.pipe, envelope, _ENVELOPE, progress)
        return
    for line, stage in zip(envelope.splitlines(keepends=True), _ENVELOPE, strict=True):
        await _group(connection.pipe, line, (stage,), progress)


async def _group(pipe: Pipe, data: bytes, stages: tuple[str, ...], progress: _Progress) -> None:
    """Write ``data`` and judge its replies in order; a refusal that arrived comes first."""
    replies: list[Reply] = []
    try:
        await pipe.wait(pipe.expect(data, len(stages), replies))
    except (Dropped, ReplyTimeout, ReplyError):
        _judge(replies, stages, progress)
        raise
    _judge(replies, stages, progress)


def _accepted(reply: Reply) -> None:
    """The end-of-data reply: anything but 250 refuses the message."""
    if reply.code != MAIL_OK:
        raise ReplyError(reply)


def _judge(replies: list[Reply], stages: tuple[str, ...], progress: _Progress) -> None:
    for index, (reply, stage) in enumerate(zip(replies, stages, strict=False)):
        if reply.code not in _WANTED[stage]:
            # A server that still said 354 after a refusal waits for a body: no RSET can help.
            later = replies[index + 1 :]
            raise ReplyError(reply, resettable=all(r.code != DATA_OK for r in later))
        if stage == "rcpt":
            progress.recipient_accepted = True


def _needs_smtputf8(sender: str, recipient: str, data: bytes) -> str | None:
    """What needs SMTPUTF8 (a non-ASCII local part, or UTF-8 in a header), or None."""
    if data.isascii() and sender.isascii() and recipient.isascii():
        return None  # the common case, in three passes of C
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
    if isinstance(exc, Dropped):
        return True
    return isinstance(exc, ReplyError) and exc.reply.code == _SERVICE_CLOSING


async def _reset(pipe: Pipe) -> bool:
    """RSET after a refusal, confirmed by its 250 before the connection is reused."""
    if not pipe.usable:
        return False
    try:
        replies = await pipe.exchange(b"RSET\r\n", 1)
    except (Dropped, ReplyTimeout, ReplyError, OSError):
        return False
    return replies[0].code == MAIL_OK


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
