"""No poison spreads through the mail path: docs/design.md §3 invariant 8.

Each attack runs against a real PostgreSQL outbox and a real SMTP server (the raw scriptable
one in ``tests.fakes.raw_smtp``): the good rows of the batch are delivered exactly once
(counted by Message-ID at the server), the poison row ends with its reason, and the log
names its id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import structlog
from structlog.testing import LogCapture

from nproxyd.actors.mail_sender import MailSender, MailSettings
from nproxyd.adapters.mail_smtp import SmtpTransport
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import SmtpConfig
from nproxyd.store.database import Database
from nproxyd.store.stores import OutboxStore
from tests.fakes.raw_smtp import RawSmtpServer

pytestmark = pytest.mark.anyio

FROM = "nproxy billing <billing@nproxy.localhost>"
LATIN1_REPLY = "Zur\xfcckgewiesen: Empf\xe4nger unbekannt".encode("latin-1")


def settings(**overrides: Any) -> MailSettings:
    values: dict[str, Any] = {
        "interval_seconds": 15.0,
        "batch_size": 200,
        "lease_seconds": 120.0,
        "max_attempts": 8,
        "concurrency": 2,
        "from_address": FROM,
        "instance_id": "sender-a",
    }
    values.update(overrides)
    return MailSettings(**values)


def message_id(index: int) -> str:
    return f"<mail-{index}@nproxy.localhost>"


def address(index: int) -> str:
    return f"user{index}@example.test"


async def insert_mail(db: Database, count: int, now: datetime, *, start: int = 0) -> list[str]:
    """Insert ``count`` due rows with only the contract columns; returns their ids in order."""
    rows = await db.pool.fetch(
        "INSERT INTO mail_outbox (to_address, subject, body, message_id, next_attempt_at)"
        " SELECT 'user' || i || '@example.test', 'Subject ' || i,"
        " 'Body of mail ' || i, '<mail-' || i || '@nproxy.localhost>', $3"
        " FROM generate_series($1::int, $2::int) AS i ORDER BY i RETURNING id",
        start,
        start + count - 1,
        now,
    )
    return [row["id"] for row in rows]


async def outbox_row(db: Database, mail_id: str) -> asyncpg.Record:
    row = await db.pool.fetchrow("SELECT * FROM mail_outbox WHERE id = $1", mail_id)
    assert row is not None
    return row


@pytest.fixture
def raw_server() -> Iterator[RawSmtpServer]:
    with RawSmtpServer() as running:
        yield running


@pytest.fixture
def logs() -> LogCapture:
    capture = LogCapture()
    structlog.configure(processors=[capture])
    return capture


@pytest.fixture
async def transport(raw_server: RawSmtpServer) -> AsyncIterator[SmtpTransport]:
    config = SmtpConfig(
        host=raw_server.host, port=raw_server.port, timeout_seconds=5.0, max_connections=2
    )
    opened = SmtpTransport(config)
    yield opened
    await opened.aclose()


def sender_for(db: Database, transport: SmtpTransport, **overrides: Any) -> MailSender:
    return MailSender(OutboxStore(db), transport, settings(**overrides), clock=SystemClock())


def events(logs: LogCapture, name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs.entries if entry["event"] == name]


class TestNonUtf8Replies:
    @pytest.mark.parametrize("stage", ["rcpt", "data_end"])
    async def test_latin1_refusal_kills_only_its_row(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
        stage: str,
    ) -> None:
        """A 554 in Latin-1 makes its row dead with a clean reason; the rest are sent once."""
        now = SystemClock().now()
        ids = await insert_mail(db, 5, now)
        reply = b"554 5.7.1 " + LATIN1_REPLY
        if stage == "rcpt":
            raw_server.answer_rcpt(address(2), reply)
        else:
            raw_server.answer_data_end(address(2), reply)

        report = await sender_for(db, transport).tick(now)

        assert (report.sent_count, report.dead_count) == (4, 1)
        assert raw_server.message_ids() == Counter({message_id(i): 1 for i in (0, 1, 3, 4)})
        dead = await outbox_row(db, ids[2])
        assert dead["status"] == "dead"
        assert "554" in dead["last_error"]
        assert "Zur\ufffdckgewiesen" in dead["last_error"]
        assert [entry["mail_id"] for entry in events(logs, "mail_dead")] == [ids[2]]
