"""MailSender against a real PostgreSQL outbox and a real SMTP server (aiosmtpd).

docs/design.md §3 invariant 3: delivery is at least once and never lost, a row leaves ``pending``
only as ``sent`` or ``dead`` with its reason, its Message-ID is stable across retries, and
instances never send the same row at the same time.
"""

from __future__ import annotations

import email
import email.policy
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime, timedelta
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from nproxyd.actors.mail_sender import MailPorts, MailSender, MailSettings
from nproxyd.adapters.mail_maildir import MaildirTransport
from nproxyd.adapters.mail_smtp import SmtpTransport
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import SmtpConfig
from nproxyd.core.errors import DatabaseUnavailable
from nproxyd.core.ports import MailTransport
from nproxyd.core.records import MailOutcome, OutboxCounts, OutboxMail
from nproxyd.store.database import Database
from nproxyd.store.stores import OutboxStore
from tests.fakes.smtp import FakeSmtpServer

pytestmark = pytest.mark.anyio

FROM = "nproxy billing <billing@nproxy.localhost>"
SUBJECT = "Your nproxy subscription renewal invoice"
BODY = (
    "Your current subscription period is ending soon.\n"
    "Current access ends at 2026-03-15T11:00:00.000Z.\n"
    "Invoice amount: 29 USDT.\n"
    "Payment address: TXYZ-grüße-1.\n"
    "Open billing: http://127.0.0.1:3000/billing"
)
HOUR = timedelta(hours=1)


def settings(**overrides: Any) -> MailSettings:
    values: dict[str, Any] = {
        "interval_seconds": 15.0,
        "batch_size": 200,
        "lease_seconds": 120.0,
        "max_attempts": 8,
        "concurrency": 3,
        "from_address": FROM,
        "instance_id": "sender-a",
        "retry_base_seconds": 30.0,
        "retry_max_seconds": 3600.0,
    }
    values.update(overrides)
    return MailSettings(**values)


def smtp_config(server: FakeSmtpServer, max_connections: int = 3) -> SmtpConfig:
    return SmtpConfig(
        host=server.host, port=server.port, timeout_seconds=5.0, max_connections=max_connections
    )


def message_id(index: int) -> str:
    return f"<mail-{index}@nproxy.localhost>"


def received_ids(server: FakeSmtpServer) -> Counter[str]:
    return Counter(str(message.message["Message-ID"]) for message in server.messages)


def body_of(message: EmailMessage) -> str:
    content = message.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


async def insert_mail(
    db: Database, count: int, now: datetime, *, start: int = 0, to: str | None = None
) -> list[str]:
    """Insert ``count`` due rows with only the contract columns; returns their ids in order."""
    rows = await db.pool.fetch(
        "INSERT INTO mail_outbox (to_address, subject, body, message_id, next_attempt_at)"
        " SELECT coalesce($4, 'user' || i || '@example.test'), 'Subject ' || i,"
        " 'Body of mail ' || i, '<mail-' || i || '@nproxy.localhost>', $3"
        " FROM generate_series($1::int, $2::int) AS i ORDER BY i RETURNING id",
        start,
        start + count - 1,
        now,
        to,
    )
    return [row["id"] for row in rows]


async def outbox_row(db: Database, mail_id: str) -> asyncpg.Record:
    row = await db.pool.fetchrow("SELECT * FROM mail_outbox WHERE id = $1", mail_id)
    assert row is not None
    return row


async def statuses(db: Database) -> Counter[str]:
    rows = await db.pool.fetch("SELECT status FROM mail_outbox")
    return Counter(row["status"] for row in rows)


@pytest.fixture
def server() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer() as running:
        yield running


@pytest.fixture
async def transports() -> AsyncIterator[list[MailTransport]]:
    """Transports a test opened; closed at teardown."""
    opened: list[MailTransport] = []
    yield opened
    for transport in opened:
        await transport.aclose()


SenderFactory = Callable[..., tuple[MailSender, SmtpTransport]]


@pytest.fixture
def make_sender(
    db: Database, server: FakeSmtpServer, transports: list[MailTransport]
) -> SenderFactory:
    def make(max_connections: int = 3, **overrides: Any) -> tuple[MailSender, SmtpTransport]:
        transport = SmtpTransport(smtp_config(server, max_connections))
        transports.append(transport)
        sender = MailSender(
            settings(concurrency=max_connections, **overrides),
            MailPorts(store=OutboxStore(db), transport=transport),
            SystemClock(),
        )
        return sender, transport

    return make


class TestDelivery:
    async def test_delivers_exact_subject_body_and_stored_message_id(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """A due row arrives with its exact subject, body and stored Message-ID; sent_at = now."""
        now = SystemClock().now()
        mail_id = await OutboxStore(db).enqueue(
            to_address="alice@example.test",
            subject=SUBJECT,
            body=BODY,
            message_id="<renewal-1@nproxy.localhost>",
            dedupe_key="renewal-invoice:inv_1",
            now=now,
        )
        assert mail_id is not None
        sender, _ = make_sender()

        report = await sender.tick(now)

        assert (report.claimed, report.sent_count, report.dead_count) == (1, 1, 0)
        [received] = server.messages
        assert received.rcpt_tos == ("alice@example.test",)
        assert received.mail_from == "billing@nproxy.localhost"
        message = received.message
        assert message["Subject"] == SUBJECT
        assert message["To"] == "alice@example.test"
        assert message["Message-ID"] == "<renewal-1@nproxy.localhost>"
        assert body_of(message) == BODY + "\n"
        row = await outbox_row(db, mail_id)
        assert row["status"] == "sent"
        assert row["sent_at"] == now
        assert row["attempts"] == 1
        assert row["last_error"] is None
        assert row["leased_by"] == ""
        assert row["lease_until"] is None

    async def test_row_not_yet_due_is_left_alone(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """A row whose next_attempt_at lies after ``now`` is not sent by that tick."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now + HOUR)
        sender, _ = make_sender()

        report = await sender.tick(now)

        assert report.claimed == 0
        assert server.messages == []
        row = await outbox_row(db, mail_id)
        assert (row["status"], row["attempts"]) == ("pending", 0)

    async def test_retry_after_transient_failure_keeps_message_id(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """After a 451 the row backs off with its error, then goes out with the same Message-ID."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now)
        server.fail_next(1)
        sender, _ = make_sender()

        first = await sender.tick(now)

        assert (first.sent_count, first.retried_count, first.dead_count) == (0, 1, 0)
        assert server.messages == []
        row = await outbox_row(db, mail_id)
        assert row["status"] == "pending"
        assert row["attempts"] == 1
        assert "451" in row["last_error"]
        retry_at = row["next_attempt_at"]
        assert now < retry_at <= now + timedelta(seconds=sender.settings.retry_base_seconds)
        assert row["lease_until"] is None

        early = await sender.tick(retry_at - timedelta(milliseconds=1))
        assert early.claimed == 0

        second = await sender.tick(retry_at)

        assert second.sent_count == 1
        [received] = server.messages
        assert received.message["Message-ID"] == row["message_id"] == message_id(0)
        row = await outbox_row(db, mail_id)
        assert (row["status"], row["attempts"], row["sent_at"]) == ("sent", 2, retry_at)

    async def test_server_down_keeps_rows_pending_then_delivers_all(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """With the server down no row is lost or charged an attempt; all arrive once it is back."""
        now = SystemClock().now()
        sender, _ = make_sender()
        await insert_mail(db, 1, now, start=100)
        assert (await sender.tick(now)).sent_count == 1  # leaves a pooled connection behind
        server.stop()
        ids = await insert_mail(db, 10, now)

        down = await sender.tick(now)

        assert (down.claimed, down.sent_count, down.deferred_count) == (10, 0, 10)
        assert down.retried_count == 0
        rows = await db.pool.fetch("SELECT * FROM mail_outbox WHERE id = ANY($1)", ids)
        assert len(rows) == 10
        for row in rows:
            assert row["status"] == "pending"
            assert row["attempts"] == 0
            assert row["last_error"]
            assert row["next_attempt_at"] > now
            assert row["lease_until"] is None

        server.start()
        later = now + 2 * HOUR
        up = await sender.tick(later)

        assert up.sent_count == 10
        assert await statuses(db) == Counter(sent=11)
        assert received_ids(server) == Counter({message_id(i): 1 for i in [*range(10), 100]})

    async def test_refused_recipient_is_dead_while_rest_of_batch_is_sent(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """A 550 kills only its own row, with the reason; the other rows of the batch are sent."""
        now = SystemClock().now()
        ids = await insert_mail(db, 6, now)
        server.reject_recipient("user3@example.test")
        sender, _ = make_sender()

        report = await sender.tick(now)

        assert (report.claimed, report.sent_count, report.dead_count) == (6, 5, 1)
        dead = await outbox_row(db, ids[3])
        assert dead["status"] == "dead"
        assert "550" in dead["last_error"]
        assert dead["attempts"] == 1
        assert dead["sent_at"] is None
        for mail_id in ids[:3] + ids[4:]:
            assert (await outbox_row(db, mail_id))["status"] == "sent"
        assert all(m.rcpt_tos != ("user3@example.test",) for m in server.messages)
        assert len(server.messages) == 5

    async def test_max_attempts_makes_row_dead_with_reason(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """A row that keeps failing is retried until max_attempts, then dead with the reason."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now)
        server.fail_next(100)
        sender, _ = make_sender(max_attempts=3)

        for attempt in (1, 2):
            report = await sender.tick(now + 2 * attempt * HOUR)
            assert report.retried_count == 1
            row = await outbox_row(db, mail_id)
            assert (row["status"], row["attempts"]) == ("pending", attempt)
        report = await sender.tick(now + 6 * HOUR)

        assert (report.retried_count, report.dead_count) == (0, 1)
        row = await outbox_row(db, mail_id)
        assert row["status"] == "dead"
        assert row["attempts"] == 3
        assert "3 attempts" in row["last_error"]
        assert "451" in row["last_error"]
        assert server.messages == []
        assert (await sender.tick(now + 24 * HOUR)).claimed == 0

    @pytest.mark.parametrize(
        "address",
        [
            "",
            "not-an-address",
            "Alice <alice@example.test>",
            "alice@example.test, bob@example.test",
            "alice@example.test\r\nRCPT TO:<evil@example.test>",
            " alice@example.test",
            "alice@",
        ],
    )
    async def test_malformed_address_is_dead_without_a_connection(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory, address: str
    ) -> None:
        """A row with an empty or malformed address goes dead; the server never sees it."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now, to=address)
        sender, transport = make_sender()

        report = await sender.tick(now)

        assert report.dead_count == 1
        row = await outbox_row(db, mail_id)
        assert row["status"] == "dead"
        assert "invalid recipient address" in row["last_error"]
        assert server.connections == 0
        assert transport.connections_opened == 0
        assert server.messages == []

    async def test_subject_that_cannot_be_a_header_is_dead_without_a_connection(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """A subject with a line break (header injection) goes dead; the server never sees it."""
        now = SystemClock().now()
        row = await db.pool.fetchrow(
            "INSERT INTO mail_outbox (to_address, subject, body, next_attempt_at)"
            " VALUES ('alice@example.test', $1, 'Body', $2) RETURNING id",
            "Invoice\r\nBcc: evil@example.test",
            now,
        )
        assert row is not None
        sender, transport = make_sender()

        report = await sender.tick(now)

        assert report.dead_count == 1
        dead = await outbox_row(db, row["id"])
        assert dead["status"] == "dead"
        assert dead["last_error"]
        assert server.connections == 0
        assert transport.connections_opened == 0

    async def test_connections_are_reused_up_to_max_connections(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """200 rows with max_connections 3 go out over at most 3 SMTP connections."""
        now = SystemClock().now()
        await insert_mail(db, 200, now)
        sender, transport = make_sender(max_connections=3, batch_size=50)

        report = await sender.tick(now)

        assert report.sent_count == 200
        assert await statuses(db) == Counter(sent=200)
        assert received_ids(server) == Counter({message_id(i): 1 for i in range(200)})
        assert 1 <= server.connections <= 3
        assert transport.connections_opened <= 3


class LeaseLedger:
    """Who holds which row, as seen through the store; flags a row leased by two at once."""

    def __init__(self, holders: int) -> None:
        self.holding: dict[str, str] = {}
        self.claims: Counter[str] = Counter()
        self.by_holder: Counter[str] = Counter()
        self.violations: list[tuple[str, str, str]] = []
        self._waiting = holders
        self.all_claimed = anyio.Event()

    def claimed(self, holder: str, batch: Sequence[OutboxMail]) -> None:
        for mail in batch:
            other = self.holding.get(mail.id)
            if other is not None:
                self.violations.append((mail.id, other, holder))
            self.holding[mail.id] = holder
            self.claims[mail.id] += 1
        self.by_holder[holder] += len(batch)

    def released(self, outcomes: Sequence[MailOutcome]) -> None:
        for outcome in outcomes:
            self.holding.pop(outcome.id, None)

    async def first_batch_taken(self) -> None:
        """Hold each sender after its first batch until every sender holds one."""
        self._waiting -= 1
        if self._waiting == 0:
            self.all_claimed.set()
        with anyio.fail_after(10):
            await self.all_claimed.wait()


class LedgerStore:
    """An OutboxStore that reports every claim and record to a :class:`LeaseLedger`."""

    def __init__(self, inner: OutboxStore, ledger: LeaseLedger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.first = True

    async def due_mail(
        self, now: datetime, size: int, *, holder: str, lease_until: Callable[[], datetime]
    ) -> AsyncGenerator[list[OutboxMail], None]:
        async for batch in self.inner.due_mail(now, size, holder=holder, lease_until=lease_until):
            self.ledger.claimed(holder, batch)
            if self.first:
                self.first = False
                await self.ledger.first_batch_taken()
            yield batch

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int:
        recorded = await self.inner.record(outcomes, now, holder)
        self.ledger.released(outcomes)
        return recorded

    async def extend(self, ids: Sequence[str], holder: str, lease_until: datetime) -> int:
        return await self.inner.extend(ids, holder, lease_until)


class TestSeveralSenders:
    async def test_two_senders_deliver_each_row_exactly_once(
        self, db: Database, server: FakeSmtpServer, transports: list[MailTransport]
    ) -> None:
        """Two instances ticking together send each of 300 rows once and never share a lease."""
        now = SystemClock().now()
        await insert_mail(db, 300, now)
        ledger = LeaseLedger(holders=2)
        senders = []
        for instance in ("sender-a", "sender-b"):
            transport = SmtpTransport(smtp_config(server))
            transports.append(transport)
            store = LedgerStore(OutboxStore(db), ledger)
            senders.append(
                MailSender(
                    settings(instance_id=instance, batch_size=25),
                    MailPorts(store=store, transport=transport),
                    SystemClock(),
                )
            )
        reports = {}

        async def run(sender: MailSender) -> None:
            reports[sender.settings.instance_id] = await sender.tick(now)

        async with anyio.create_task_group() as group:
            for sender in senders:
                group.start_soon(run, sender)

        assert ledger.violations == []
        assert ledger.by_holder["sender-a"] > 0
        assert ledger.by_holder["sender-b"] > 0
        assert ledger.claims == Counter({mail_id: 1 for mail_id in ledger.claims})
        assert len(ledger.claims) == 300
        assert sum(report.sent_count for report in reports.values()) == 300
        assert received_ids(server) == Counter({message_id(i): 1 for i in range(300)})
        rows = await db.pool.fetch("SELECT status, attempts FROM mail_outbox")
        assert Counter((row["status"], row["attempts"]) for row in rows) == {("sent", 1): 300}

    async def test_batch_outliving_its_lease_is_not_sent_again_by_a_live_sender(
        self, db: Database, server: FakeSmtpServer, transports: list[MailTransport]
    ) -> None:
        """A batch slower than lease_seconds is not sent a second time while nobody crashed."""
        # Scaled down from the defaults (batch 200, 4 connections, lease 120 s): a server taking
        # 0.1 s per message makes one 40-row batch over 2 connections last 2 s, twice the lease.
        now = SystemClock().now()
        await insert_mail(db, 40, now)
        server.slow_down(0.1)
        senders = []
        for instance in ("sender-a", "sender-b"):
            transport = SmtpTransport(smtp_config(server, max_connections=2))
            transports.append(transport)
            senders.append(
                MailSender(
                    settings(instance_id=instance, lease_seconds=1.0, batch_size=40, concurrency=2),
                    MailPorts(store=OutboxStore(db), transport=transport),
                    SystemClock(),
                )
            )
        first, second = senders

        async def tick_later() -> None:
            await anyio.sleep(1.5)
            await second.tick(SystemClock().now())

        async with anyio.create_task_group() as group:
            group.start_soon(tick_later)
            await first.tick(now)

        assert await statuses(db) == Counter(sent=40)
        duplicates = {mid: n for mid, n in received_ids(server).items() if n > 1}
        assert duplicates == {}

    async def test_rows_of_a_crashed_sender_are_sent_after_its_lease(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """Rows leased by a sender that never recorded are delivered once its lease elapsed."""
        now = SystemClock().now()
        ids = await insert_mail(db, 5, now)
        crashed = await OutboxStore(db).claim(now, now + timedelta(seconds=1), "crashed", 100)
        assert sorted(mail.id for mail in crashed) == sorted(ids)
        row = await outbox_row(db, ids[0])
        assert row["leased_by"] == "crashed"
        sender, _ = make_sender()

        during = await sender.tick(now + timedelta(milliseconds=500))
        assert during.claimed == 0
        assert server.messages == []

        after = await sender.tick(now + timedelta(seconds=2))

        assert after.sent_count == 5
        assert await statuses(db) == Counter(sent=5)
        assert received_ids(server) == Counter({message_id(i): 1 for i in range(5)})


class TestMaildir:
    async def test_rows_become_files_in_new_with_headers(
        self, db: Database, tmp_path: Path, transports: list[MailTransport]
    ) -> None:
        """With the maildir transport each row becomes one file in new/ with its headers."""
        now = SystemClock().now()
        store = OutboxStore(db)
        mail_ids = []
        for index in range(3):
            mail_id = await store.enqueue(
                to_address=f"user{index}@example.test",
                subject=SUBJECT,
                body=BODY,
                message_id=message_id(index),
                dedupe_key=None,
                now=now,
            )
            mail_ids.append(mail_id)
        transport = MaildirTransport(tmp_path / "Maildir")
        transports.append(transport)
        sender = MailSender(settings(), MailPorts(store=store, transport=transport), SystemClock())

        report = await sender.tick(now)

        assert report.sent_count == 3
        files = sorted((tmp_path / "Maildir" / "new").iterdir())
        assert len(files) == 3
        assert list((tmp_path / "Maildir" / "tmp").iterdir()) == []
        by_id = {}
        for path in files:
            parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            by_id[str(parsed["Message-ID"])] = parsed
        assert sorted(by_id) == sorted(message_id(i) for i in range(3))
        for index in range(3):
            parsed = by_id[message_id(index)]
            assert parsed["Delivered-To"] == f"user{index}@example.test"
            assert parsed["To"] == f"user{index}@example.test"
            assert parsed["From"] == FROM
            assert parsed["Subject"] == SUBJECT
            assert parsed["Date"] is not None
            assert body_of(parsed) == BODY + "\n"
        rows = await db.pool.fetch("SELECT status, sent_at FROM mail_outbox")
        assert [(row["status"], row["sent_at"]) for row in rows] == [("sent", now)] * 3


class TestCounts:
    async def test_outbox_counts_reports_pending_and_dead(
        self, db: Database, server: FakeSmtpServer, make_sender: SenderFactory
    ) -> None:
        """outbox_counts counts pending (due or not) and dead rows, never sent ones."""
        store = OutboxStore(db)
        now = SystemClock().now()
        assert await store.counts() == OutboxCounts(pending=0, dead=0)
        await insert_mail(db, 3, now)
        await insert_mail(db, 2, now + HOUR, start=10)
        await insert_mail(db, 2, now, start=20, to="broken")
        assert await store.counts() == OutboxCounts(pending=7, dead=0)
        sender, _ = make_sender()

        await sender.tick(now)

        assert await store.counts() == OutboxCounts(pending=2, dead=2)
        assert await statuses(db) == Counter(sent=3, pending=2, dead=2)


class TestLeaseFencing:
    async def test_outcome_of_a_lost_lease_is_not_recorded(self, db: Database) -> None:
        """A sender whose lease another instance took over cannot overwrite that lease."""
        now = SystemClock().now()
        store = OutboxStore(db)
        await insert_mail(db, 1, now)
        (mail,) = await store.claim(now, now + timedelta(seconds=1), "slow", 10)
        later = now + timedelta(seconds=2)
        (taken,) = await store.claim(later, later + timedelta(seconds=60), "fast", 10)
        outcome = MailOutcome(id=mail.id, status="sent", error=None, next_attempt_at=later)

        assert await store.record([outcome], later, "slow") == 0
        row = await outbox_row(db, taken.id)
        assert (row["status"], row["leased_by"]) == ("pending", "fast")
        assert await store.record([outcome], later, "fast") == 1


class BuggyTransport:
    """The real SMTP transport, except that sending to ``bug@example.test`` hits a bug once
    ``others`` other mails were delivered (so the bug lands amid a batch, whatever its order)."""

    def __init__(self, inner: SmtpTransport, others: int) -> None:
        self.inner = inner
        self.others = others
        self.delivered = 0
        self.all_delivered = anyio.Event()

    async def send(self, message: Message, recipient: str) -> None:
        if recipient == "bug@example.test":
            with anyio.fail_after(10):
                await self.all_delivered.wait()
            raise TypeError("a bug in the transport")
        await self.inner.send(message, recipient)
        self.delivered += 1
        if self.delivered == self.others:
            self.all_delivered.set()

    async def aclose(self) -> None:
        await self.inner.aclose()


class TestProgrammingErrors:
    async def test_a_bug_fails_the_tick_after_recording_what_was_delivered(
        self, db: Database, server: FakeSmtpServer, transports: list[MailTransport]
    ) -> None:
        """A non-mail error in one send fails the tick; the mails its neighbours delivered are
        recorded sent first (never sent again), and the row at fault keeps its attempts."""
        now = SystemClock().now()
        good = await insert_mail(db, 3, now)
        [bad] = await insert_mail(db, 1, now, start=10, to="bug@example.test")
        transport = SmtpTransport(smtp_config(server, 4))
        transports.append(transport)
        ports = MailPorts(store=OutboxStore(db), transport=BuggyTransport(transport, others=3))
        sender = MailSender(settings(concurrency=4), ports, SystemClock())

        with pytest.raises(TypeError, match="a bug in the transport"):
            await sender.tick(now)

        rows = {mail_id: await outbox_row(db, mail_id) for mail_id in [*good, bad]}
        assert [rows[mail_id]["status"] for mail_id in good] == ["sent"] * 3
        assert sorted(received_ids(server).values()) == [1, 1, 1]
        assert (rows[bad]["status"], rows[bad]["attempts"]) == ("pending", 0)


class WatchingTransport:
    """The real SMTP transport; the first send waits until ``leased`` rows are leased
    (``seen`` records whether that happened) while its own batch is still on the wire."""

    def __init__(self, inner: SmtpTransport, db: Database, leased: int) -> None:
        self.inner = inner
        self.db = db
        self.leased = leased
        self.seen: bool | None = None
        self.sends = 0

    async def send(self, message: Message, recipient: str) -> None:
        self.sends += 1
        if self.seen is None:
            self.seen = False
            with anyio.move_on_after(5):
                while (
                    await self.db.pool.fetchval(
                        "SELECT count(*) FROM mail_outbox"
                        " WHERE status = 'pending' AND leased_by <> ''"
                    )
                    < self.leased
                ):
                    await anyio.sleep(0.01)
                self.seen = True
        await self.inner.send(message, recipient)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FailingRecordStore(OutboxStore):
    """An outbox whose first ``record`` fails as if the database had gone away."""

    failed = False

    async def record(self, outcomes: Sequence[MailOutcome], now: datetime, holder: str) -> int:
        if not self.failed:
            self.failed = True
            raise DatabaseUnavailable("the database went away")
        return await super().record(outcomes, now, holder)


def watched_sender(
    db: Database, server: FakeSmtpServer, transports: list[MailTransport]
) -> tuple[WatchingTransport, MailSender]:
    """A sender of batches of 2 over one connection, its transport watching for the 4th lease."""
    inner = SmtpTransport(smtp_config(server, 1))
    transports.append(inner)
    transport = WatchingTransport(inner, db, leased=4)
    ports = MailPorts(store=OutboxStore(db), transport=transport)
    return transport, MailSender(settings(batch_size=2, concurrency=1), ports, SystemClock())


class TestOverlap:
    async def test_next_batch_is_leased_while_one_is_on_the_wire(
        self, db: Database, server: FakeSmtpServer, transports: list[MailTransport]
    ) -> None:
        """The batch after the one being delivered is leased before that delivery ends."""
        now = SystemClock().now()
        await insert_mail(db, 6, now)
        transport, sender = watched_sender(db, server, transports)

        report = await sender.tick(now)

        assert transport.seen is True
        assert (report.claimed, report.sent_count) == (6, 6)
        assert received_ids(server) == Counter({message_id(i): 1 for i in range(6)})

    async def test_outage_defers_the_batch_leased_behind_without_asking_the_server(
        self, db: Database, server: FakeSmtpServer, transports: list[MailTransport]
    ) -> None:
        """With the server down, the batch leased meanwhile is deferred without a send, and no
        further batch is leased: its rows stay untouched."""
        now = SystemClock().now()
        ids = await insert_mail(db, 6, now)
        server.stop()
        transport, sender = watched_sender(db, server, transports)

        report = await sender.tick(now)

        assert transport.seen is True
        assert transport.sends == 1  # the first refusal defers the rest, leased or not
        assert (report.claimed, report.deferred_count, report.sent_count) == (4, 4, 0)
        rows = [await outbox_row(db, mail_id) for mail_id in ids]
        deferred = [row for row in rows if row["last_error"] is not None]
        untouched = [row for row in rows if row["last_error"] is None]
        assert len(deferred) == 4
        for row in deferred:
            assert (row["status"], row["attempts"], row["leased_by"]) == ("pending", 0, "")
            assert row["next_attempt_at"] > now
        assert [(row["status"], row["next_attempt_at"], row["leased_by"]) for row in untouched] == [
            ("pending", now, "")
        ] * 2

    async def test_a_recording_failure_is_raised_after_the_batch_on_the_wire_is_recorded(
        self, db: Database, server: FakeSmtpServer, transports: list[MailTransport]
    ) -> None:
        """A batch delivered while the database refused to record the one before is recorded
        before the tick fails: only the unrecorded batch is ever sent again."""
        now = SystemClock().now()
        ids = await insert_mail(db, 6, now)
        transport = SmtpTransport(smtp_config(server, 1))
        transports.append(transport)
        ports = MailPorts(store=FailingRecordStore(db), transport=transport)
        sender = MailSender(settings(batch_size=2, concurrency=1), ports, SystemClock())

        with pytest.raises(DatabaseUnavailable):
            await sender.tick(now)

        rows = [await outbox_row(db, mail_id) for mail_id in ids]
        states = Counter((row["status"], bool(row["leased_by"])) for row in rows)
        # The first batch delivered but unrecorded and the third (leased while the first was
        # being recorded) keep their leases: both are taken again once the leases elapse. The
        # second, delivered meanwhile, is recorded sent.
        assert states == {("pending", True): 4, ("sent", False): 2}
        assert sorted(received_ids(server).values()) == [1, 1, 1, 1]
