"""Maildir mail transport: each message becomes one file in ``<path>/new``, for local use.

A message is written under ``tmp/``, flushed to disk, then renamed into ``new/``, so a reader
never sees half a message. The envelope recipient is kept as a leading ``Delivered-To:``
header, as local delivery agents do, because a Maildir has no envelope.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from uuid import uuid4

import anyio

from nproxyd.core.clock import SystemClock
from nproxyd.core.errors import MailPermanentError, MailTransientError
from nproxyd.core.rules import address_problem

_SUBDIRS = ("tmp", "new", "cur")


def _system_epoch_seconds() -> float:
    return SystemClock().now().timestamp()


class MaildirTransport:
    """Writes mail into a Maildir; implements :class:`nproxyd.core.ports.MailTransport`."""

    def __init__(
        self,
        path: Path,
        hostname: str | None = None,
        now: Callable[[], float] = _system_epoch_seconds,
    ) -> None:
        self._path = Path(path)
        self._host = _safe_host(hostname or socket.gethostname())
        self._now = now
        self._sequence = itertools.count(1)

    @property
    def path(self) -> Path:
        return self._path

    async def send(self, message: Message, recipient: str) -> None:
        """Store ``message`` for ``recipient`` in ``new/``; raises a :class:`MailError`."""
        content = _render(message, recipient)
        name = self._unique_name()
        try:
            await anyio.to_thread.run_sync(_deliver, self._path, name, content)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise MailTransientError(f"maildir {self._path}: {reason}") from exc

    async def aclose(self) -> None:
        """Nothing to release: every send opens and closes its own file."""

    def _unique_name(self) -> str:
        # Maildir convention: time.MusecPpidQseqRrandom.host; the random part keeps names
        # unique across processes sharing one Maildir even when the clock is injected.
        seconds = self._now()
        whole = int(seconds)
        micros = int((seconds - whole) * 1_000_000)
        sequence = next(self._sequence)
        return f"{whole}.M{micros}P{os.getpid()}Q{sequence}R{uuid4().hex}.{self._host}"


def _render(message: Message, recipient: str) -> bytes:
    problem = address_problem(recipient)
    if problem is not None:
        raise MailPermanentError(f"invalid recipient address: {problem}")
    try:
        body = message.as_bytes()
    except (ValueError, TypeError, UnicodeError, LookupError) as exc:
        raise MailPermanentError(f"message cannot be serialised: {exc}") from exc
    return b"Delivered-To: " + recipient.encode("utf-8") + b"\n" + body


def _deliver(root: Path, name: str, content: bytes) -> None:
    for subdir in _SUBDIRS:
        (root / subdir).mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = root / "tmp" / name
    final = root / "new" / name
    try:
        _write_synced(temporary, content)
        os.rename(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(root / "new")


def _write_synced(path: Path, content: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(content)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_directory(path: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _safe_host(hostname: str) -> str:
    """Escape the characters the Maildir convention reserves in the host part."""
    return hostname.replace("/", r"\057").replace(":", r"\072")
