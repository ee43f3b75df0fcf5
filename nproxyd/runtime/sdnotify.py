"""A tiny sd_notify(3) client: ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``.

Without ``NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``) every call is a no-op.
Notifications are best effort: a failure is logged, never raised.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

from nproxyd.runtime.actor import EventLogger


def _socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value; None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify datagrams to one socket, or nothing when *address* is None."""

    def __init__(self, address: str | None, *, logger: EventLogger | None = None) -> None:
        self._address = address
        self._log: EventLogger = logger or structlog.get_logger()
        self._failure_logged = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, logger: EventLogger | None = None
    ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``; a no-op one when it is unset or empty."""
        value = environ.get("NOTIFY_SOCKET", "")
        address = _socket_address(value) if value else None
        notifier = cls(address, logger=logger)
        if value and address is None:
            notifier._log_failure("unsupported NOTIFY_SOCKET address")
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send *fields* (``"READY=1"``, ...) as one datagram; True if it was sent."""
        if self._address is None or not fields:
            return False
        # A newline would start a new assignment; keep each field one assignment.
        payload = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop on a busy service manager.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._log_failure(type(exc).__name__)
            return False
        self._failure_logged = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self, status: str | None = None) -> bool:
        return self.send("WATCHDOG=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def _log_failure(self, reason: str) -> None:
        # Once per run of failures: a watchdog ping every few seconds must not flood the log.
        if not self._failure_logged:
            self._failure_logged = True
            self._log.warning("sd_notify_failed", reason=reason)


def watchdog_interval_seconds(
    environ: Mapping[str, str], *, pid: int | None = None
) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, or None if not asked.

    ``WATCHDOG_PID``, when set, must name this process (*pid*, default ``os.getpid()``).
    """
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid:
        own = os.getpid() if pid is None else pid
        if not watchdog_pid.isdigit() or int(watchdog_pid) != own:
            return None
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2 / 1_000_000
