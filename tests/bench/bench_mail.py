"""Mail benchmark (docs/design.md §6): the outbox through pooled SMTP connections.

10,000 outbox mails are delivered by one ``MailSender.tick`` over ``SmtpTransport`` with
``max_connections = 4``; the reference sends the same 10,000 messages in sequence, one new
aiosmtplib connection per message (connect, send, quit), and touches no database. Both run
``REPETITIONS`` times, interleaved; each tick has its own copy of the outbox.

The SMTP server is ``tests.fakes.smtp.FakeSmtpServer`` in a child process, as a real server
would be: in this process its Python code would share the GIL with the client being measured.
"""

from __future__ import annotations

import multiprocessing
import socket
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import aiosmtplib
import asyncpg
import msgspec

from nproxyd.actors.mail_sender import MailPorts, MailSender
from nproxyd.adapters.mail_smtp import SmtpTransport
from nproxyd.app import mail_settings
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import Config
from nproxyd.core.mail import compose_message
from nproxyd.core.messages import MailReport
from nproxyd.core.rules import RENEWAL_SUBJECT, render_renewal_body
from nproxyd.store.stores import OutboxStore
from tests.bench.common import (
    CURRENCY,
    NOW,
    PRICE,
    Databases,
    Figure,
    Stopwatch,
    connected,
    duration,
    median,
    note,
    opened,
    padded,
    seeding,
    spread,
)
from tests.fakes.smtp import FakeSmtpServer
from tests.pg import TestServer

MAILS = 10_000
MAX_CONNECTIONS = 4
REPETITIONS = 3
SPEEDUP_TARGET = 5.0
_START_TIMEOUT_SECONDS = 30.0


def _serve(pipe: Connection) -> None:
    """The child process: run the fake server, answer ``stats`` until ``stop``."""
    server = FakeSmtpServer().start()
    try:
        pipe.send(server.port)
        while pipe.recv() != "stop":
            pipe.send((server.connections, len(server.messages)))
    finally:
        server.stop()


class SmtpServerProcess:
    """:class:`FakeSmtpServer` in a child process; ``stats()`` is (connections, messages)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_serve, args=(child,), name="fake-smtp", daemon=True
        )
        self.host = "127.0.0.1"
        self.port = 0

    def __enter__(self) -> SmtpServerProcess:
        self.process.start()
        if not self.pipe.poll(_START_TIMEOUT_SECONDS):
            raise TimeoutError("the SMTP server process did not start")
        self.port = self.pipe.recv()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pipe.send("stop")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

    def stats(self) -> tuple[int, int]:
        self.pipe.send("stats")
        connections, messages = self.pipe.recv()
        return int(connections), int(messages)

    def since(self, before: tuple[int, int]) -> tuple[int, int]:
        """(connections, messages) the server saw since ``before`` (an earlier ``stats()``)."""
        connections, messages = self.stats()
        return connections - before[0], messages - before[1]


def smtp_config(server: SmtpServerProcess) -> Config:
    config = Config()
    smtp = msgspec.structs.replace(
        config.email.smtp, host=server.host, port=server.port, max_connections=MAX_CONNECTIONS
    )
    email = msgspec.structs.replace(config.email, transport="smtp", smtp=smtp)
    return msgspec.structs.replace(config, email=email)


async def seed_outbox(dsn: str) -> None:
    """``MAILS`` due renewal mails, each to its own recipient."""
    body = render_renewal_body(
        period_end=NOW + timedelta(hours=47),
        amount=PRICE,
        currency=CURRENCY,
        payment_address="sim_addr_2b8f0c6e9d7a4f3b8e1c5d2a6f9b0e7c",
        expires_at=NOW + timedelta(hours=24),
        app_base_url=Config().urls.app_base_url,
    )
    async with seeding(dsn) as connection:
        await connection.execute(
            f"INSERT INTO mail_outbox (id, to_address, subject, body, message_id, dedupe_key,"
            f" next_attempt_at, created_at, updated_at)"
            f" SELECT {padded('m')}, 'user' || g || '@example.com', $2, $3,"
            f"  '<bench-' || g || '@nproxy.localhost>', 'renewal-invoice:bench-' || g, $4, $4, $4"
            f" FROM generate_series(1, $1) AS g",
            MAILS,
            RENEWAL_SUBJECT,
            body,
            NOW - timedelta(minutes=1),
        )


async def sender_tick(dsn: str, config: Config) -> tuple[float, MailReport]:
    """One ``MailSender.tick`` as the daemon builds it; returns (seconds, report)."""
    transport = SmtpTransport(config.email.smtp)
    settings = mail_settings(config, "bench")
    async with opened(dsn) as db:
        sender = MailSender(
            settings, MailPorts(store=OutboxStore(db), transport=transport), SystemClock()
        )
        try:
            with Stopwatch() as watch:
                report = await sender.tick(NOW)
        finally:
            await transport.aclose()
    return watch.seconds, report


async def one_connection_per_message(
    rows: list[asyncpg.Record], config: Config, server: SmtpServerProcess
) -> float:
    """The reference: in sequence, connect, send and quit for every message."""
    # Resolved once, as the transport does: a per-message getfqdn would only slow the reference.
    local_hostname = socket.getfqdn()
    with Stopwatch() as watch:
        for row in rows:
            message = compose_message(
                from_address=config.email.from_address,
                to_address=row["to_address"],
                subject=row["subject"],
                body=row["body"],
                message_id=row["message_id"],
                date=NOW,
            )
            client = aiosmtplib.SMTP(
                hostname=server.host, port=server.port, local_hostname=local_hostname, timeout=30
            )
            await client.connect()
            await client.send_message(message, recipients=[row["to_address"]])
            await client.quit()
    return watch.seconds


async def run(server: TestServer) -> list[Figure]:
    """The tick (on a fresh copy of the outbox each time) and the reference, interleaved
    (A/B, then B/A) over ``REPETITIONS``; medians and spreads are printed."""
    bench = "mail"
    runs = _Runs()
    async with Databases(server, "mail") as databases:
        base = await databases.clone()
        await seed_outbox(base)
        async with connected(base) as connection:
            rows = await connection.fetch(
                "SELECT to_address, subject, body, message_id FROM mail_outbox ORDER BY id"
            )
        with SmtpServerProcess() as smtp:
            config = smtp_config(smtp)
            for repetition in range(REPETITIONS):
                tick_first = repetition % 2 == 0
                for run_tick in (tick_first, not tick_first):
                    if run_tick:
                        await runs.tick(bench, databases, base, config, smtp)
                    else:
                        await runs.reference(bench, rows, config, smtp)
    speedup = median(runs.references) / median(runs.ticks)
    return [
        Figure(
            name=bench,
            measured=f"{duration(median(runs.ticks))}{spread(runs.ticks)}",
            reference=f"{duration(median(runs.references))}{spread(runs.references)}"
            "(one connection per message)",
            ratio=speedup,
            target=f">={SPEEDUP_TARGET:g}x",
            passed=runs.complete and speedup >= SPEEDUP_TARGET,
        ),
        Figure(
            name=f"{bench}_connections",
            measured=str(runs.connections),
            reference=str(runs.reference_connections),
            ratio=runs.connections / MAX_CONNECTIONS,
            target=f"<={MAX_CONNECTIONS}(max_connections)",
            passed=runs.complete and runs.connections <= MAX_CONNECTIONS,
        ),
    ]


class _Runs:
    """The runs of both sides so far: seconds, connections the server saw, completeness."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.references: list[float] = []
        self.connections = 0  # the most one tick opened
        self.reference_connections = 0
        self.complete = True

    async def tick(
        self,
        bench: str,
        databases: Databases,
        base: str,
        config: Config,
        smtp: SmtpServerProcess,
    ) -> None:
        dsn = await databases.copy(base)
        before = smtp.stats()
        seconds, report = await sender_tick(dsn, config)
        await databases.drop(dsn)
        opened_now, delivered = smtp.since(before)
        note(bench, f"tick {duration(seconds)}: {report}; server saw {opened_now} conn.")
        self.ticks.append(seconds)
        self.connections = max(self.connections, opened_now)
        self.complete = self.complete and report.sent_count == delivered == MAILS

    async def reference(
        self, bench: str, rows: list[asyncpg.Record], config: Config, smtp: SmtpServerProcess
    ) -> None:
        before = smtp.stats()
        seconds = await one_connection_per_message(rows, config, smtp)
        opened_now, delivered = smtp.since(before)
        note(bench, f"reference {duration(seconds)}: {opened_now} connections")
        self.references.append(seconds)
        self.reference_connections = opened_now
        self.complete = self.complete and delivered == MAILS
