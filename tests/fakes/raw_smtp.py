"""A raw, scriptable SMTP server on 127.0.0.1 for tests (asyncio streams in its own thread).

Unlike :mod:`tests.fakes.smtp` (aiosmtpd, a well-behaved server), this one answers whatever
bytes a test scripts, at any step: a Latin-1 or NUL-laden reply at RCPT or at the end of DATA,
a reply far longer than a line should be, no reply at all (the connection dropped, or kept
open in silence), or a reply trickled out byte by byte. It advertises SMTPUTF8 and PIPELINING
only when asked to, and it records every message it accepted, so a test can count deliveries
by Message-ID.

Replies are given without their final CRLF; a scripted reply may hold several lines.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["connect", "ehlo", "mail", "rcpt", "data", "data_end"]
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_ADDRESS = re.compile(rb"<([^>]*)>")
_LINE_LIMIT = 1 << 20


@dataclass(frozen=True)
class RawMessage:
    """One message the server accepted (a 2xx at the end of DATA)."""

    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    raw: bytes

    @property
    def message_id(self) -> str | None:
        found = _MESSAGE_ID.search(self.raw)
        return found.group(1).decode("utf-8", "replace") if found else None


@dataclass
class _Script:
    """What the server answers; read under the owner's lock."""

    smtputf8: bool = False
    pipelining: bool = False
    trickle_seconds: float = 0.0
    mail_reply: bytes = b"250 2.1.0 OK"
    data_reply: bytes = b"354 End data with <CR><LF>.<CR><LF>"
    rset_reply: bytes = b"250 2.0.0 OK"
    data_without_recipient: bytes = b"503 5.5.1 No valid recipients"
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    data_end_replies: dict[str, bytes] = field(default_factory=dict)
    drops: Counter[Stage] = field(default_factory=Counter)
    stalls: Counter[Stage] = field(default_factory=Counter)


@dataclass
class _Envelope:
    mail_from: str = ""
    started: bool = False  # MAIL was accepted
    options: tuple[str, ...] = ()
    rcpt_tos: list[str] = field(default_factory=list)


class RawSmtpServer:
    """A scriptable SMTP server; see the module docstring. Use as a context manager."""

    def __init__(
        self, *, smtputf8: bool = False, pipelining: bool = False, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.port = _free_port(host)
        self._script = _Script(smtputf8=smtputf8, pipelining=pipelining)
        self._lock = threading.Lock()
        self._messages: list[RawMessage] = []
        self._connections = 0
        self._commands: list[bytes] = []
        self._groups: list[list[bytes]] = []
        self._followed_data = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> RawSmtpServer:
        """Listen on ``host:port`` (the same port on every start)."""
        assert self._thread is None, "already running"
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="raw-smtp", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), loop)
        future.result(timeout=5.0)
        return self

    def stop(self) -> None:
        """Close every connection and stop listening: connects are refused afterwards."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=5.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        loop.close()
        self._loop, self._thread = None, None

    def __enter__(self) -> RawSmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- script ----------------------------------------------------------------------------

    def answer_rcpt(self, address: str, reply: bytes) -> None:
        """Answer ``RCPT TO:<address>`` with ``reply`` from now on."""
        with self._lock:
            self._script.rcpt_replies[address.lower()] = reply

    def answer_data_end(self, address: str, reply: bytes) -> None:
        """Answer the end of DATA of messages to ``address`` with ``reply`` from now on."""
        with self._lock:
            self._script.data_end_replies[address.lower()] = reply

    def answer_mail(self, reply: bytes) -> None:
        """Answer every ``MAIL FROM`` with ``reply`` from now on."""
        with self._lock:
            self._script.mail_reply = reply

    def answer_data(self, reply: bytes) -> None:
        """Answer every ``DATA`` command (that has a recipient) with ``reply`` from now on."""
        with self._lock:
            self._script.data_reply = reply

    def answer_data_without_recipient(self, reply: bytes) -> None:
        """Answer a ``DATA`` that has no accepted recipient with ``reply`` from now on (a
        broken server's ``354``: it then reads a body, and refuses it)."""
        with self._lock:
            self._script.data_without_recipient = reply

    def answer_rset(self, reply: bytes) -> None:
        """Answer every ``RSET`` with ``reply`` from now on (the transaction is reset anyway)."""
        with self._lock:
            self._script.rset_reply = reply

    def drop_at(self, stage: Stage, count: int = 1) -> None:
        """Close the connection instead of answering at ``stage``, ``count`` times."""
        with self._lock:
            self._script.drops[stage] += count

    def stall_at(self, stage: Stage, count: int = 1) -> None:
        """Answer nothing at ``stage`` and keep the connection open, ``count`` times."""
        with self._lock:
            self._script.stalls[stage] += count

    def trickle(self, seconds: float) -> None:
        """Send every reply one byte at a time, ``seconds`` apart (0: all at once)."""
        with self._lock:
            self._script.trickle_seconds = seconds

    # -- what was received -----------------------------------------------------------------

    @property
    def messages(self) -> list[RawMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """Connections accepted since construction (including dropped ones)."""
        with self._lock:
            return self._connections

    @property
    def commands(self) -> list[bytes]:
        """Every command line received, without its line end."""
        with self._lock:
            return list(self._commands)

    @property
    def command_groups(self) -> list[list[bytes]]:
        """Command lines grouped by arrival: a line read while the next was already buffered
        shares its group (a pipelining client's ``MAIL``, ``RCPT`` and ``DATA``)."""
        with self._lock:
            return [list(group) for group in self._groups]

    @property
    def commands_after_data(self) -> int:
        """How many times the next command had already arrived with a message's final ``.``
        (a pipelining client writing one message's body and the next envelope together)."""
        with self._lock:
            return self._followed_data

    def message_ids(self) -> Counter[str]:
        """How many times each Message-ID was accepted."""
        return Counter(message.message_id or "" for message in self.messages)

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[RawMessage]:
        """Wait until at least ``count`` messages were accepted; raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.messages)} of {count} messages arrived")
            time.sleep(0.02)
        return self.messages

    # -- the server thread -----------------------------------------------------------------

    async def _listen(self) -> None:
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(
            self._session, self.host, self.port, limit=_LINE_LIMIT, reuse_address=True
        )

    async def _close(self) -> None:
        server, self._server = self._server, None
        if self._closing is not None:
            self._closing.set()
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if server is not None:
            await server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._connections += 1
        self._writers.add(writer)
        try:
            if await self._reply(writer, "connect", b"220 raw-smtp.localhost ESMTP ready"):
                await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        envelope = _Envelope()
        joined = False  # the previous line arrived with this one
        while True:
            line = await reader.readuntil(b"\n")
            command = line.rstrip(b"\r\n")
            with self._lock:
                self._commands.append(command)
                if joined:
                    self._groups[-1].append(command)
                else:
                    self._groups.append([command])
                joined = bool(reader._buffer)  # type: ignore[attr-defined]  # what already arrived
            verb = command[:4].upper()
            if verb == b"QUIT":
                await self._reply(writer, None, b"221 2.0.0 Bye")
                return
            if verb == b"DATA":
                if not await self._data(reader, writer, envelope):
                    return
                envelope = _Envelope()
                continue
            stage, reply = self._answer(verb, command, envelope)
            if not await self._reply(writer, stage, reply):
                return

    def _answer(
        self, verb: bytes, command: bytes, envelope: _Envelope
    ) -> tuple[Stage | None, bytes]:
        with self._lock:
            script = self._script
            if verb in (b"EHLO", b"HELO"):
                return "ehlo", self._ehlo(verb)
            if verb == b"MAIL":
                envelope.mail_from = _address(command)
                envelope.options = tuple(command.decode("utf-8", "replace").split()[2:])
                envelope.started = script.mail_reply[:1] == b"2"
                return "mail", script.mail_reply
            if verb == b"RCPT":
                if not envelope.started:  # as a real server: no recipient without a sender
                    return "rcpt", b"503 5.5.1 Error: need MAIL command"
                address = _address(command)
                reply = script.rcpt_replies.get(address.lower(), b"250 2.1.5 OK")
                if reply[:1] == b"2":
                    envelope.rcpt_tos.append(address)
                return "rcpt", reply
        if verb in (b"RSET", b"NOOP"):
            if verb == b"RSET":
                envelope.rcpt_tos.clear()
                envelope.started = False
                with self._lock:
                    return None, self._script.rset_reply
            return None, b"250 2.0.0 OK"
        return None, b"500 5.5.2 Command not recognized"

    def _ehlo(self, verb: bytes) -> bytes:
        if verb == b"HELO":
            return b"250 raw-smtp.localhost"
        lines = [b"raw-smtp.localhost", b"8BITMIME"]
        if self._script.smtputf8:
            lines.append(b"SMTPUTF8")
        if self._script.pipelining:
            lines.append(b"PIPELINING")
        lines.append(b"HELP")
        return b"\r\n".join(
            b"250" + (b" " if index == len(lines) - 1 else b"-") + item
            for index, item in enumerate(lines)
        )

    async def _data(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, envelope: _Envelope
    ) -> bool:
        if not envelope.rcpt_tos:
            with self._lock:
                refusal = self._script.data_without_recipient
            if refusal[:3] != b"354":
                return await self._reply(writer, "data", refusal)
            if not await self._reply(writer, "data", refusal):
                return False
            while await reader.readuntil(b"\n") not in (b".\r\n", b".\n"):
                pass
            return await self._reply(writer, "data_end", b"554 5.5.1 No valid recipients")
        with self._lock:
            data_reply = self._script.data_reply
        if data_reply[:3] != b"354":
            return await self._reply(writer, "data", data_reply)
        if not await self._reply(writer, "data", data_reply):
            return False
        lines: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\n")
            if line in (b".\r\n", b".\n"):
                with self._lock:
                    self._followed_data += bool(reader._buffer)  # type: ignore[attr-defined]
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        with self._lock:
            first = envelope.rcpt_tos[0].lower()
            reply = self._script.data_end_replies.get(first, b"250 2.0.0 Message accepted")
            if reply[:1] == b"2" and not self._script.drops["data_end"]:
                self._messages.append(
                    RawMessage(
                        mail_from=envelope.mail_from,
                        mail_options=envelope.options,
                        rcpt_tos=tuple(envelope.rcpt_tos),
                        raw=b"".join(lines),
                    )
                )
        return await self._reply(writer, "data_end", reply)

    async def _reply(self, writer: asyncio.StreamWriter, stage: Stage | None, reply: bytes) -> bool:
        """Send ``reply`` (or drop the connection if scripted at ``stage``); False when dropped."""
        with self._lock:
            drop = self._take(self._script.drops, stage)
            stall = not drop and self._take(self._script.stalls, stage)
            trickle = self._script.trickle_seconds
        if stall and self._closing is not None:
            await self._closing.wait()
        if drop or stall:
            writer.close()
            return False
        payload = reply + b"\r\n"
        if trickle <= 0:
            writer.write(payload)
        else:
            for index in range(len(payload)):
                writer.write(payload[index : index + 1])
                await writer.drain()
                await asyncio.sleep(trickle)
        await writer.drain()
        return True

    @staticmethod
    def _take(scripted: Counter[Stage], stage: Stage | None) -> bool:
        if stage is None or scripted[stage] <= 0:
            return False
        scripted[stage] -= 1
        return True


def _address(command: bytes) -> str:
    found = _ADDRESS.search(command)
    return found.group(1).decode("utf-8", "replace") if found else ""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
