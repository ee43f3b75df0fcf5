"""The mail exchange of one SMTP connection, pipelined (RFC 2920) when the server offers it.

aiosmtplib opens the connection (TCP, implicit TLS or STARTTLS, AUTH, EHLO); the transport it
leaves is then driven by :class:`Pipe`, an ``asyncio.Protocol`` that writes a whole group of
commands at once and parses every reply that comes back, however the bytes are split.

With PIPELINING a message is submitted whole (:meth:`Pipe.submit`) and driven from the reply
handler: ``MAIL``, ``RCPT`` and ``DATA`` go together; ``DATA`` ends the group (RFC 2920 §3.1), so
the body and its ``.`` go only after its ``354``, written from ``data_received`` in the same
write as the envelope of the message submitted behind it (held until then: after ``DATA``
anything written would be body). A refused envelope is followed by ``RSET`` in that write
instead of the body; if the server said ``354`` after all, it waits for a body and the
connection is failed. The sender's task wakes once per message, at its end-of-data reply.
Without PIPELINING each command waits for its reply (lock-step).

Each reply must arrive within ``timeout`` seconds of the previous one, or of the write that
asked for it (the per-command timeout aiosmtplib applies), checked by one watchdog timer per
connection that re-arms itself only when it fires. Replies keep their raw bytes: the caller
makes them storable.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import NamedTuple

# aiosmtplib's limits: one reply line, and one whole (multi-line) reply.
MAX_LINE_LENGTH = 8192
MAX_REPLY_LENGTH = MAX_LINE_LENGTH * 4
GARBLED = -1  # the code of a reply that is not SMTP: the stream is out of step

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

MAIL_OK = 250
RCPT_OK = (250, 251)
DATA_OK = 354


class Reply(NamedTuple):
    code: int
    text: bytes  # its lines without their codes, joined with "\n", as the server sent them


class ReplyError(Exception):
    """The server answered a command of this message with a refusal (or garbage)."""

    def __init__(self, reply: Reply, *, resettable: bool = True) -> None:
        super().__init__(reply.code)
        self.reply = reply
        self.resettable = resettable  # False when the server still waits for a body


class Dropped(Exception):
    """The connection went away (or was never usable) before every reply arrived."""


class ReplyTimeout(Exception):
    """The server sent no reply within the timeout."""


def command(verb: bytes, argument: bytes, *options: bytes) -> bytes:
    """One command line; a control character (CR, LF, NUL ...) in it is refused locally."""
    line = b" ".join((verb + b" " + argument, *options))
    if _CONTROL.search(line):
        raise ValueError("an SMTP command argument contains a control character")
    return line + b"\r\n"


def data_block(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, leading periods doubled, ``.`` last.

    Every CR, LF or CRLF becomes one CRLF (as aiosmtplib does), by plain replaces.
    """
    message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class _Expected:
    """Replies one write asked for, filled in order as they arrive; ``body``: a submitted
    message's DATA block, written once its envelope's three replies are in."""

    __slots__ = ("body", "count", "future", "replies", "reset")

    def __init__(
        self,
        count: int,
        replies: list[Reply],
        future: asyncio.Future[None],
        body: bytes | None = None,
    ) -> None:
        self.count = count
        self.replies = replies
        self.future = future
        self.body = body
        self.reset = False  # the RSET after a refused envelope: anything but 250 fails the pipe


ENVELOPE_OK = ((MAIL_OK,), RCPT_OK, (DATA_OK,))
_RESET = b"RSET\r\n"


_SEPARATORS = (b" ", b"-", b"\r", b"")  # what may follow a reply code: text, more lines, the end


def _is_code(code: bytes) -> bool:
    """Three digits starting with 2 to 5: the reply codes SMTP has (anything else is garbled)."""
    return len(code) == 3 and code.isdigit() and b"2" <= code[:1] <= b"5"


class Pipe(asyncio.Protocol):
    """Writes groups of commands and collects their replies; see the module docstring.

    Several writes may await their replies at once (a message's end of data and the next
    message's envelope, when pipelining): replies go to them in the order they were written.
    """

    def __init__(self, transport: asyncio.Transport, timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = transport
        self._timeout = timeout
        self._partial = b""  # the start of a line whose end has not arrived
        self._lines: list[bytes] = []  # the lines so far of a multi-line reply
        self._size = 0  # their length
        self._expected: deque[_Expected] = deque()
        # A DATA is on the wire without its reply yet: what is written now would be body, so
        # writes wait in ``_held`` (with whether each one ends in a DATA of its own).
        self._in_data = False
        self._held: deque[tuple[bytes, bool]] = deque()
        self._failure: Exception | None = None
        self._last_reply = 0.0
        self._timer: asyncio.TimerHandle | None = None
        transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        """Open and in step (replies may still be due to earlier writes, in order)."""
        transport = self._transport
        return (
            self._failure is None
            and transport is not None
            and not transport.is_closing()
            and (bool(self._expected) or not (self._partial or self._lines))
        )

    def expect(self, data: bytes, count: int, replies: list[Reply]) -> asyncio.Future[None]:
        """Write ``data`` and expect ``count`` replies into ``replies``; the future says when.

        Behind a submitted message whose DATA is unanswered, ``data`` waits for its body.
        """
        transport = self._transport
        if self._failure is not None or transport is None or transport.is_closing():
            raise Dropped("the connection is closed")
        future = self._loop.create_future()
        self._arm()
        self._expected.append(_Expected(count, replies, future))
        if self._in_data:
            self._held.append((data, False))
        else:
            transport.write(data)
        return future

    def submit(self, envelope: bytes, body: bytes, replies: list[Reply]) -> asyncio.Future[None]:
        """Pipeline one message: ``envelope`` (MAIL, RCPT, DATA), then ``body`` after its 354.

        The future is done with the envelope's three replies in ``replies`` when they refuse
        the message (an ``RSET`` follows by itself), else with those and the end-of-data reply.
        """
        transport = self._transport
        if self._failure is not None or transport is None or transport.is_closing():
            raise Dropped("the connection is closed")
        future = self._loop.create_future()
        self._arm()
        self._expected.append(_Expected(4, replies, future, body))
        if self._in_data:
            self._held.append((envelope, True))
        else:
            self._in_data = True
            transport.write(envelope)
        return future

    def _arm(self) -> None:
        """One watchdog per connection, re-armed only when it fires (see _expire)."""
        if not self._expected and self._timeout is not None:
            self._last_reply = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._last_reply + self._timeout, self._expire)

    async def wait(self, future: asyncio.Future[None]) -> None:
        """Wait for an expectation; an interrupted wait leaves the stream out of step."""
        try:
            await future
        except BaseException:
            self._fail(Dropped("the exchange was interrupted"))
            raise

    async def exchange(self, data: bytes, count: int) -> list[Reply]:
        """Write ``data`` and wait for its ``count`` replies."""
        replies: list[Reply] = []
        await self.wait(self.expect(data, count, replies))
        return replies

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._fail(Dropped("the connection was closed"))

    async def quit(self) -> None:
        """QUIT politely (its reply awaited within the timeout), then close."""
        try:
            await self.exchange(b"QUIT\r\n", 1)
        except (Dropped, ReplyTimeout, ReplyError, OSError):
            pass
        finally:
            self.close()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        lines = data.split(b"\n")
        rest = lines.pop()  # what follows the last line end: the start of a line, or nothing
        for line in lines:
            if self._failure is not None:
                return
            # The common case inline: a one-line reply ("250 2.0.0 Ok") while none is open.
            code = line[:3]
            if line[3:4] == b" " and not self._lines and _is_code(code) and len(line) < 512:
                self._received(Reply(int(code), line[4:].strip(b" \t\r\n")))
            else:
                self._line(line)
        if rest and self._failure is None:
            if len(rest) > MAX_LINE_LENGTH:
                self._garbled(b"Response too long")
            else:
                self._partial = rest

    def eof_received(self) -> bool:
        self._fail(Dropped("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(Dropped("connection lost" + (f": {exc}" if exc else "")))

    # -- internals -------------------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        """One complete reply line (without its LF): part of a reply, or its last line."""
        if len(line) >= MAX_LINE_LENGTH:  # with its LF, longer than a line may be
            self._garbled(b"Response too long")
            return
        code = line[:3]
        if not _is_code(code) or line[3:4] not in _SEPARATORS:
            self._garbled(b"Malformed SMTP response line: " + line.strip())
            return
        text = line[4:].strip(b" \t\r\n")
        if line[3:4] == b"-":
            self._lines.append(text)
            self._size += len(line) + 1
            if self._size > MAX_REPLY_LENGTH:
                self._garbled(b"Response too long")
            return
        if self._lines:
            self._lines.append(text)
            text = b"\n".join(self._lines)
            self._lines, self._size = [], 0
        self._received(Reply(int(code), text))

    def _received(self, reply: Reply) -> None:
        if not self._expected:  # unasked (a 421 before closing): out of step
            self._fail(Dropped(f"unexpected reply {reply.code} between commands"))
            return
        head = self._expected[0]
        head.replies.append(reply)
        if self._timer is not None:
            self._last_reply = self._loop.time()
        if head.body is not None and len(head.replies) == 3:
            self._envelope_answered(head)
        elif len(head.replies) >= head.count:
            self._expected.popleft()
            if not head.future.done():
                head.future.set_result(None)
            if head.reset and reply.code != MAIL_OK:
                self._fail(Dropped(f"RSET refused: {reply.code}"))

    def _envelope_answered(self, head: _Expected) -> None:
        """A submitted message's MAIL, RCPT and DATA replies are in: its body goes, or RSET."""
        body = head.body
        assert body is not None
        codes = [reply.code for reply in head.replies]
        if all(code in wanted for code, wanted in zip(codes, ENVELOPE_OK, strict=True)):
            self._release(body)
            return
        self._expected.popleft()
        if not head.future.done():
            head.future.set_result(None)
        if DATA_OK in codes:  # refused, yet the server waits for a body: out of step for good
            self._fail(Dropped("the server accepted DATA after refusing the message"))
            return
        reset = _Expected(1, [], self._loop.create_future())
        reset.reset = True
        self._expected.appendleft(reset)
        self._release(_RESET)

    def _release(self, data: bytes) -> None:
        """Write ``data`` (a body, or RSET) with what waited for it, up to the next DATA."""
        parts = [data]
        self._in_data = False
        while self._held and not self._in_data:
            held, self._in_data = self._held.popleft()
            parts.append(held)
        transport = self._transport
        if transport is not None and self._failure is None:
            transport.write(b"".join(parts))

    def _garbled(self, text: bytes) -> None:
        self._partial, self._lines, self._size = b"", [], 0
        self._fail(ReplyError(Reply(GARBLED, text)))

    def _fail(self, exc: Exception) -> None:
        """Fail every write still awaiting replies. Only the oldest one is told the cause (a
        timeout or a garbled reply is about it); the later ones just lost their connection."""
        if self._failure is None:
            self._failure = exc
        self._held.clear()
        expected, self._expected = self._expected, deque()
        for waiting in expected:
            if not waiting.future.done():
                waiting.future.set_exception(exc)
                waiting.future.exception()  # retrieved: whoever awaits it still gets it
            if not isinstance(exc, Dropped):
                exc = Dropped(f"the connection failed on an earlier message: {exc}")

    def _expire(self) -> None:
        self._timer = None
        if not self._expected or self._timeout is None:
            return  # nothing awaited: the next write arms the watchdog again
        deadline = self._last_reply + self._timeout
        if deadline > self._loop.time():  # a reply came meanwhile: the next one has until then
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._fail(ReplyTimeout("timed out waiting for the server's reply"))
