"""Mail benchmark (docs/design.md §6): the outbox through pooled SMTP connections.

10,000 outbox mails are delivered by one ``MailSender.tick`` over ``SmtpTransport`` with
``max_connections = 4``; the reference sends the same 10,000 messages in sequence, one new
aiosmtplib connection per message (connect, send, quit), and touches no database.

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
    note,
    opened,
    padded,
    seeding,
)
from tests.fakes.smtp import FakeSmtpServer
from tests.pg import TestServer

MAILS = 10_000
MAX_CONNECTIONS = 4
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
    bench = "mail"
    async with Databases(server, "mail") as databases:
        dsn = await databases.clone()
        await seed_outbox(dsn)
        async with connected(dsn) as connection:
            rows = await connection.fetch(
                "SELECT to_address, subject, body, message_id FROM mail_outbox ORDER BY id"
            )
        with SmtpServerProcess() as smtp:
            config = smtp_config(smtp)
            seconds, report = await sender_tick(dsn, config)
            connections, delivered = smtp.stats()
            note(bench, f"tick {duration(seconds)}: {report}; server saw {connections} conn.")
            reference = await one_connection_per_message(rows, config, smtp)
            reference_connections, total = smtp.stats()
            reference_connections -= connections
            note(bench, f"reference {duration(reference)}: {reference_connections} connections")
    complete = report.sent_count == delivered == MAILS and total == 2 * MAILS
    speedup = reference / seconds
    return [
        Figure(
            name=bench,
            measured=duration(seconds),
            reference=f"{duration(reference)}(one connection per message)",
            ratio=speedup,
            target=f">={SPEEDUP_TARGET:g}x",
            passed=complete and speedup >= SPEEDUP_TARGET,
        ),
        Figure(
            name=f"{bench}_connections",
            measured=str(connections),
            reference=str(reference_connections),
            ratio=connections / MAX_CONNECTIONS,
            target=f"<={MAX_CONNECTIONS}(max_connections)",
            passed=complete and connections <= MAX_CONNECTIONS,
        ),
    ]
