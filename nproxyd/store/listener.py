"""The driver side of NOTIFY wake-ups: one dedicated ``LISTEN`` connection, never pooled.

A LISTEN lives in a session, so it needs a connection of its own straight to PostgreSQL (a
transaction pooler would hand the session to someone else). :func:`listening` opens it, calls
``on_notify`` for every notification on the channel, and sets :attr:`Listening.lost` when the
connection ends for any reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import anyio
import asyncpg

from nproxyd.store.database import connect_session, map_errors
from nproxyd.store.sql import QUERIES

MAIL_DUE_CHANNEL = "nproxyd_mail_due"
APPLICATION_NAME = "nproxyd-listener"
_CLOSE_TIMEOUT_SECONDS = 2.0


class Listening:
    """An open LISTEN session."""

    def __init__(self, connection: asyncpg.Connection, channel: str, lost: anyio.Event) -> None:
        self._connection = connection
        self.channel = channel
        self.lost = lost

    @property
    def backend_pid(self) -> int:
        """The server process serving this session (what ``pg_terminate_backend`` takes)."""
        return int(self._connection.get_server_pid())

    async def ping(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless the session still answers."""
        with map_errors():
            await self._connection.fetchval(QUERIES["ping"])


@asynccontextmanager
async def listening(
    dsn: str,
    channel: str,
    on_notify: Callable[[], None],
    *,
    timeout_seconds: float,
) -> AsyncIterator[Listening]:
    """LISTEN on ``channel`` over a new session; raises :class:`DatabaseUnavailable`."""
    connection = await connect_session(
        dsn, timeout_seconds=timeout_seconds, application_name=APPLICATION_NAME
    )
    lost = anyio.Event()

    def notified(*_: Any) -> None:
        on_notify()

    connection.add_termination_listener(lambda _: lost.set())
    try:
        with map_errors():
            await connection.add_listener(channel, notified)
        yield Listening(connection, channel, lost)
    finally:
        await _close(connection, lost)


def mail_due_sessions(
    dsn: str, *, timeout_seconds: float
) -> Callable[[Callable[[], None]], AbstractAsyncContextManager[Listening]]:
    """What the runtime's listener opens: LISTEN ``nproxyd_mail_due`` sessions at ``dsn``."""

    def open_session(on_notify: Callable[[], None]) -> AbstractAsyncContextManager[Listening]:
        return listening(dsn, MAIL_DUE_CHANNEL, on_notify, timeout_seconds=timeout_seconds)

    return open_session


async def _close(connection: asyncpg.Connection, lost: anyio.Event) -> None:
    if lost.is_set() or connection.is_closed():
        connection.terminate()
        return
    with anyio.CancelScope(shield=True), suppress(Exception):
        await connection.close(timeout=_CLOSE_TIMEOUT_SECONDS)
    if not connection.is_closed():
        connection.terminate()
