"""No poison spreads through the mail path: docs/design.md §3 invariant 8.

Each attack runs against a real PostgreSQL outbox and a real SMTP server (the raw scriptable
one in ``tests.fakes.raw_smtp``): the good rows of the batch are delivered exactly once
(counted by Message-ID at the server), the poison row ends with its reason, and the log
names its id.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Iterator, MutableMapping
from datetime import datetime, timedelta
from email.message import Message
from typing import Any

import asyncpg
import pytest
import structlog
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from structlog.testing import LogCapture

from nproxyd.actors.mail_sender import MailPorts, MailSender, MailSettings
from nproxyd.adapters.mail_smtp import SmtpTransport
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import SmtpConfig
from nproxyd.core.errors import (
    MailError,
    MailPermanentError,
    MailTransientError,
    MailUnavailableError,
    StoreDataError,
    StoreError,
)
from nproxyd.core.mail import compose_message
from nproxyd.core.text import is_storable
from nproxyd.store.database import Database, map_errors
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
        "retry_base_seconds": 30.0,
        "retry_max_seconds": 3600.0,
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
    ports = MailPorts(store=OutboxStore(db), transport=transport)
    return MailSender(settings(**overrides), ports, SystemClock())


def answer_at(server: RawSmtpServer, stage: str, recipient: str, reply: bytes) -> None:
    """Script ``reply`` for ``recipient`` at RCPT (``"rcpt"``) or at the end of DATA."""
    if stage == "rcpt":
        server.answer_rcpt(recipient, reply)
    else:
        server.answer_data_end(recipient, reply)


def events(logs: LogCapture, name: str) -> list[MutableMapping[str, Any]]:
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
        answer_at(raw_server, stage, address(2), reply)

        report = await sender_for(db, transport).tick(now)

        assert (report.sent_count, report.dead_count) == (4, 1)
        assert raw_server.message_ids() == Counter({message_id(i): 1 for i in (0, 1, 3, 4)})
        dead = await outbox_row(db, ids[2])
        assert dead["status"] == "dead"
        assert "554" in dead["last_error"]
        assert "Zur\ufffdckgewiesen" in dead["last_error"]
        assert [entry["mail_id"] for entry in events(logs, "mail_dead")] == [ids[2]]

    @pytest.mark.parametrize("stage", ["rcpt", "data_end"])
    async def test_latin1_temporary_refusal_is_retried_with_a_clean_reason(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
        stage: str,
    ) -> None:
        """A 451 in Latin-1 is recorded (pending, attempts 1, clean text); the rest sent once."""
        now = SystemClock().now()
        ids = await insert_mail(db, 4, now)
        reply = b"451 4.7.1 " + LATIN1_REPLY
        answer_at(raw_server, stage, address(1), reply)

        report = await sender_for(db, transport).tick(now)

        assert (report.sent_count, report.retried_count) == (3, 1)
        assert raw_server.message_ids() == Counter({message_id(i): 1 for i in (0, 2, 3)})
        row = await outbox_row(db, ids[1])
        assert (row["status"], row["attempts"], row["leased_by"]) == ("pending", 1, "")
        assert "451" in row["last_error"]
        assert "4.7.1 Zur\ufffdckgewiesen: Empf\ufffdnger" in row["last_error"]
        assert "[invalid text replaced]" in row["last_error"]
        retries = [(e["mail_id"], e["log_level"]) for e in events(logs, "mail_retry_scheduled")]
        assert retries == [(ids[1], "warning")]
        assert (await sender_for(db, transport).tick(now)).claimed == 0  # nothing left leased

    @pytest.mark.parametrize(
        "reply",
        [
            b"554 5.7.1 refused\x00with a NUL",
            b"554 5.7.1 " + b"x" * 5000,
            b"554-5.7.1 first line \xff\xfe\r\n554-" + b"y" * 3000 + b"\r\n554 5.7.1 last \xc3",
        ],
        ids=["nul", "huge", "multiline-invalid-utf8"],
    )
    async def test_nul_or_huge_reply_is_stored_bounded(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
        reply: bytes,
    ) -> None:
        """A reply with a NUL, or thousands of bytes, ends its row dead with a bounded reason."""
        now = SystemClock().now()
        ids = await insert_mail(db, 3, now)
        raw_server.answer_rcpt(address(0), reply)

        report = await sender_for(db, transport).tick(now)

        assert (report.sent_count, report.dead_count) == (2, 1)
        assert raw_server.message_ids() == Counter({message_id(1): 1, message_id(2): 1})
        row = await outbox_row(db, ids[0])
        assert row["status"] == "dead"
        assert "554" in row["last_error"]
        assert "\x00" not in row["last_error"]
        assert len(row["last_error"]) <= 1000
        assert [entry["mail_id"] for entry in events(logs, "mail_dead")] == [ids[0]]


# A stand-in for any value the database refuses (a constraint or trigger of the web API's, a
# type it changed): a real PostgreSQL data exception (SQLSTATE 22023) for matching updates.
REFUSE_POISON = """
CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_error LIKE '%poison%' OR OLD.to_address LIKE 'unmarkable%' THEN
        RAISE EXCEPTION 'value refused' USING ERRCODE = '22023';
    END IF;
    IF NEW.status = 'pending' AND NEW.last_error LIKE '%explode%' THEN
        RAISE EXCEPTION 'not a data error' USING ERRCODE = 'P0001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse_poison BEFORE UPDATE OF status ON mail_outbox
    FOR EACH ROW EXECUTE FUNCTION test_refuse_poison();
"""


@pytest.fixture
async def refusing_db(db: Database) -> Database:
    await db.pool.execute(REFUSE_POISON)
    return db


class TestRefusedOutcomes:
    async def test_refused_outcomes_are_bisected_and_quarantined(
        self,
        refusing_db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
    ) -> None:
        """Outcomes the database refuses are isolated: their rows dead, all others recorded."""
        db = refusing_db
        now = SystemClock().now()
        ids = await insert_mail(db, 12, now)
        raw_server.answer_rcpt(address(2), b"451 4.7.1 poison")
        raw_server.answer_rcpt(address(7), b"550 5.1.1 poison")
        raw_server.answer_rcpt(address(9), b"452 4.2.2 mailbox full")

        report = await sender_for(db, transport).tick(now)

        good = [i for i in range(12) if i not in (2, 7, 9)]
        assert raw_server.message_ids() == Counter({message_id(i): 1 for i in good})
        assert (report.sent_count, report.retried_count) == (9, 1)
        assert (report.dead_count, report.quarantined_count, report.unrecorded_count) == (2, 2, 0)
        for index in (2, 7):
            row = await outbox_row(db, ids[index])
            assert (row["status"], row["leased_by"]) == ("dead", "")
            assert row["last_error"].startswith("unstorable ")
            assert "22023" in row["last_error"]
        assert (await outbox_row(db, ids[9]))["status"] == "pending"
        quarantined = events(logs, "mail_row_quarantined")
        assert sorted(entry["mail_id"] for entry in quarantined) == sorted([ids[2], ids[7]])
        rows = await db.pool.fetch("SELECT status, count(*) AS n FROM mail_outbox GROUP BY 1")
        assert {row["status"]: row["n"] for row in rows} == {"sent": 9, "dead": 2, "pending": 1}

    async def test_row_that_cannot_be_marked_is_counted_logged_and_not_resent(
        self,
        refusing_db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
    ) -> None:
        """A row refused even as dead is counted, logged with its id, and never sent twice."""
        db = refusing_db
        now = SystemClock().now()
        ids = await insert_mail(db, 6, now)
        [stuck] = await db.pool.fetch(
            "INSERT INTO mail_outbox (to_address, subject, body, message_id, next_attempt_at)"
            " VALUES ('unmarkable@example.test', 'S', 'B', '<stuck@nproxy.localhost>', $1)"
            " RETURNING id",
            now,
        )

        sender = sender_for(db, transport)
        report = await sender.tick(now)

        assert (report.sent_count, report.unrecorded_count) == (6, 1)
        assert raw_server.message_ids()[message_id(0)] == 1
        for mail_id in ids:
            assert (await outbox_row(db, mail_id))["status"] == "sent"
        [logged] = events(logs, "mail_outcome_unrecordable")
        assert (logged["mail_id"], logged["log_level"]) == (stuck["id"], "error")
        assert (await outbox_row(db, stuck["id"]))["status"] == "pending"

        # Its lease elapses and it is claimed again: recorded again, never delivered again.
        again = await sender.tick(now + timedelta(seconds=sender.settings.lease_seconds + 1))

        assert (again.claimed, again.unrecorded_count) == (1, 1)
        assert raw_server.message_ids()["<stuck@nproxy.localhost>"] == 1
        unrecordable = events(logs, "mail_outcome_unrecordable")
        assert [entry["mail_id"] for entry in unrecordable] == [stuck["id"]] * 2

    async def test_sent_outcomes_are_recorded_before_the_others_can_fail(
        self, refusing_db: Database, raw_server: RawSmtpServer, transport: SmtpTransport
    ) -> None:
        """When recording a failure breaks the tick, the delivered mails are already sent."""
        db = refusing_db
        now = SystemClock().now()
        ids = await insert_mail(db, 5, now)
        raw_server.answer_rcpt(address(4), b"451 4.3.0 explode")

        with pytest.raises(StoreError):
            await sender_for(db, transport).tick(now)

        for mail_id in ids[:4]:
            assert (await outbox_row(db, mail_id))["status"] == "sent"
        assert (await outbox_row(db, ids[4]))["leased_by"] == "sender-a"


class TestUnrepresentableTimestamps:
    @pytest.mark.parametrize(
        ("column", "value"),
        [
            ("created_at", "0001-01-01 00:00:00+00 BC"),
            ("created_at", "10000-01-01 00:00:00+00"),
            ("created_at", "infinity"),
            ("created_at", "-infinity"),
            ("next_attempt_at", "-infinity"),
        ],
    )
    async def test_row_with_unrepresentable_timestamp_is_sent_with_its_batch(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        column: str,
        value: str,
    ) -> None:
        """A created_at or next_attempt_at Python cannot hold never fails the claim."""
        now = SystemClock().now()
        ids = await insert_mail(db, 6, now)
        await db.pool.execute(
            f"UPDATE mail_outbox SET {column} = $2::text::timestamptz WHERE id = $1",
            ids[3],
            value,
        )

        report = await sender_for(db, transport).tick(now)

        assert report.sent_count == 6
        assert raw_server.message_ids() == Counter({message_id(i): 1 for i in range(6)})
        statuses = await db.pool.fetch("SELECT status FROM mail_outbox")
        assert [row["status"] for row in statuses] == ["sent"] * 6

    async def test_dead_mail_with_unrepresentable_updated_at_is_listed(self, db: Database) -> None:
        """`mail dead` lists a row whose updated_at is out of range, with updated_at None."""
        now = SystemClock().now()
        ids = await insert_mail(db, 3, now)
        await db.pool.execute(
            "UPDATE mail_outbox SET status = 'dead', last_error = 'x',"
            " updated_at = (ARRAY['infinity', '10000-01-01', '2026-01-01'])[n]::timestamptz"
            " FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM mail_outbox) AS r"
            " WHERE r.id = mail_outbox.id"
        )

        dead = await OutboxStore(db).dead(10)

        assert sorted(row.id for row in dead) == sorted(ids)
        assert sorted(row.updated_at is None for row in dead) == [False, True, True]


class TestAddresses:
    async def test_non_ascii_address_goes_out_with_smtputf8_and_idna(
        self, db: Database, logs: LogCapture
    ) -> None:
        """üser@exämple.com is sent with SMTPUTF8 and its domain as IDNA when offered."""
        now = SystemClock().now()
        with RawSmtpServer(smtputf8=True) as server:
            transport = SmtpTransport(SmtpConfig(host=server.host, port=server.port))
            ids = await insert_mail(db, 2, now)
            await db.pool.execute(
                "UPDATE mail_outbox SET to_address = 'üser@exämple.com' WHERE id = $1", ids[0]
            )
            report = await sender_for(db, transport).tick(now)
            await transport.aclose()

        assert report.sent_count == 2
        assert server.message_ids() == Counter({message_id(0): 1, message_id(1): 1})
        utf8 = next(m for m in server.messages if m.message_id == message_id(0))
        assert utf8.rcpt_tos == ("üser@xn--exmple-cua.com",)
        assert "SMTPUTF8" in utf8.mail_options
        assert b"To: \xc3\xbcser@xn--exmple-cua.com" in utf8.raw
        plain = next(m for m in server.messages if m.message_id == message_id(1))
        assert "SMTPUTF8" not in plain.mail_options
        delivered = events(logs, "mail_delivered")
        assert sorted(e["mail_id"] for e in delivered) == sorted(ids)
        assert {e["log_level"] for e in delivered} == {"debug"}

    async def test_without_smtputf8_only_the_non_ascii_local_part_dies(
        self, db: Database, raw_server: RawSmtpServer, transport: SmtpTransport
    ) -> None:
        """No SMTPUTF8: üser@… goes dead with the reason; user@exämple.com goes out as IDNA."""
        now = SystemClock().now()
        ids = await insert_mail(db, 3, now)
        await db.pool.execute(
            "UPDATE mail_outbox SET to_address = CASE id WHEN $1 THEN 'üser@exämple.com'"
            " ELSE 'user@exämple.com' END WHERE id = ANY($2)",
            ids[0],
            ids[:2],
        )

        report = await sender_for(db, transport).tick(now)

        assert (report.sent_count, report.dead_count) == (2, 1)
        dead = await outbox_row(db, ids[0])
        assert dead["status"] == "dead"
        assert "recipient needs SMTPUTF8, which the server does not offer" in dead["last_error"]
        assert raw_server.message_ids() == Counter({message_id(1): 1, message_id(2): 1})
        idna = next(m for m in raw_server.messages if m.message_id == message_id(1))
        assert idna.rcpt_tos == ("user@xn--exmple-cua.com",)

    @pytest.mark.parametrize("smtputf8", [True, False])
    async def test_non_ascii_message_id_needs_smtputf8(self, db: Database, smtputf8: bool) -> None:
        """A UTF-8 header goes out only with SMTPUTF8; without it the mail is dead, saying so."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now)
        await db.pool.execute(
            "UPDATE mail_outbox SET message_id = '<grüße-1@nproxy.localhost>' WHERE id = $1",
            mail_id,
        )
        with RawSmtpServer(smtputf8=smtputf8) as server:
            transport = SmtpTransport(SmtpConfig(host=server.host, port=server.port))
            report = await sender_for(db, transport).tick(now)
            await transport.aclose()

        row = await outbox_row(db, mail_id)
        if smtputf8:
            assert report.sent_count == 1
            [received] = server.messages
            assert "SMTPUTF8" in received.mail_options
            assert received.message_id == "<grüße-1@nproxy.localhost>"
        else:
            assert row["status"] == "dead"
            assert (
                "message headers need SMTPUTF8, which the server does not offer"
                in (row["last_error"])
            )
            assert server.messages == []

    @pytest.mark.parametrize(
        "to",
        [
            "a" * 64 + "@" + ".".join(["b" * 60] * 4) + ".com",  # 313 characters
            "a" * 65 + "@example.test",
            "user@exa mple.test",
            "user@" + "\u0080" * 3 + ".test",
        ],
        ids=["over-254", "local-over-64", "space", "not-idna"],
    )
    async def test_undeliverable_address_is_dead_without_touching_smtp(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
        to: str,
    ) -> None:
        """An address the one rule refuses goes dead with its reason; no connection is made."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now)
        await db.pool.execute("UPDATE mail_outbox SET to_address = $2 WHERE id = $1", mail_id, to)

        report = await sender_for(db, transport).tick(now)

        assert report.dead_count == 1
        row = await outbox_row(db, mail_id)
        assert row["status"] == "dead"
        assert row["last_error"].startswith("invalid recipient address: ")
        assert raw_server.connections == 0
        assert [e["mail_id"] for e in events(logs, "mail_row_quarantined")] == [mail_id]


class TestOutages:
    async def test_outage_longer_than_max_attempts_kills_no_mail(
        self, db: Database, raw_server: RawSmtpServer, transport: SmtpTransport
    ) -> None:
        """Refused connects for many ticks use up no attempts; all is sent once it is back."""
        now = SystemClock().now()
        ids = await insert_mail(db, 5, now)
        raw_server.stop()
        sender = sender_for(db, transport, max_attempts=2, retry_max_seconds=60.0)

        for tick in range(6):
            report = await sender.tick(now + timedelta(hours=tick))
            assert (report.deferred_count, report.dead_count) == (5, 0)
        rows = await db.pool.fetch("SELECT status, attempts, last_error FROM mail_outbox")
        assert {(row["status"], row["attempts"]) for row in rows} == {("pending", 0)}
        assert all("unavailable" in row["last_error"] for row in rows)

        raw_server.start()
        report = await sender.tick(now + timedelta(hours=7))

        assert report.sent_count == 5
        assert raw_server.message_ids() == Counter({message_id(i): 1 for i in range(5)})
        assert len(ids) == 5

    @pytest.mark.parametrize("stage", ["connect", "mail"])
    async def test_server_dropping_connections_is_not_asked_once_per_mail(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        logs: LogCapture,
        stage: str,
    ) -> None:
        """A server that hangs up defers the whole batch after at most one try per connection."""
        now = SystemClock().now()
        await insert_mail(db, 50, now)
        raw_server.drop_at(stage, 1000)  # type: ignore[arg-type]
        sender = sender_for(db, transport, concurrency=2)

        report = await sender.tick(now)

        assert (report.deferred_count, report.sent_count, report.dead_count) == (50, 0, 0)
        assert raw_server.connections <= 2
        rows = await db.pool.fetch("SELECT DISTINCT attempts, next_attempt_at FROM mail_outbox")
        assert [row["attempts"] for row in rows] == [0]
        assert rows[0]["next_attempt_at"] > now
        [warning] = events(logs, "mail_server_unavailable")
        assert warning["log_level"] == "warning"

    async def test_421_before_any_recipient_uses_no_attempt(
        self, db: Database, raw_server: RawSmtpServer, transport: SmtpTransport
    ) -> None:
        """421 at MAIL FROM says nothing about the mail: deferred, attempts unchanged."""
        now = SystemClock().now()
        [mail_id] = await insert_mail(db, 1, now)
        raw_server.answer_mail(b"421 4.3.2 Service shutting down")

        report = await sender_for(db, transport, max_attempts=1).tick(now)

        assert report.deferred_count == 1
        row = await outbox_row(db, mail_id)
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert "421" in row["last_error"]

    async def test_trickled_replies_are_still_answers(
        self, db: Database, raw_server: RawSmtpServer, transport: SmtpTransport
    ) -> None:
        """A server answering byte by byte is slow, not broken: every mail is sent once."""
        now = SystemClock().now()
        await insert_mail(db, 2, now)
        raw_server.trickle(0.002)

        report = await sender_for(db, transport).tick(now)

        assert report.sent_count == 2
        assert raw_server.message_ids() == Counter({message_id(0): 1, message_id(1): 1})


_EXAMPLES = itertools.count(1000, 10)
_REPLY_CODES = st.sampled_from([b"421", b"450", b"451", b"452", b"550", b"553", b"554"])
# Any bytes on one reply line (a line break would change the framing, not the text).
_REPLY_TEXT = st.binary(max_size=400).map(lambda raw: raw.replace(b"\r", b" ").replace(b"\n", b" "))


class TestArbitraryReplies:
    @examples(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(code=_REPLY_CODES, text=_REPLY_TEXT, stage=st.sampled_from(["rcpt", "data_end"]))
    async def test_any_reply_bytes_end_recorded_and_nothing_is_sent_twice(
        self,
        db: Database,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        code: bytes,
        text: bytes,
        stage: str,
    ) -> None:
        """Whatever bytes a server answers, every row is recorded and none is delivered twice."""
        now = SystemClock().now()
        base = next(_EXAMPLES)
        ids = await insert_mail(db, 3, now, start=base)
        reply = code + b" " + text
        answer_at(raw_server, stage, address(base + 1), reply)

        await sender_for(db, transport).tick(now)

        delivered = raw_server.message_ids()
        rows = await db.pool.fetch(
            "SELECT id, status, attempts, last_error, leased_by, message_id FROM mail_outbox"
            " WHERE id = ANY($1)",
            ids,
        )
        for row in rows:
            assert row["leased_by"] == ""  # recorded, not left to its lease
            assert delivered[row["message_id"]] == (1 if row["status"] == "sent" else 0)
        poison = next(row for row in rows if row["id"] == ids[1])
        assert poison["status"] in ("pending", "dead")
        assert code.decode() in poison["last_error"]
        assert len(poison["last_error"]) <= 1000
        if code != b"421":  # 421 defers the rest of the batch; anything else touches only its row
            assert [row["status"] for row in rows if row["id"] != ids[1]] == ["sent", "sent"]


def compose(to: str) -> Message:
    return compose_message(
        from_address=FROM,
        to_address=to,
        subject="Hello",
        body="Body",
        message_id="<classify@nproxy.localhost>",
        date=SystemClock().now(),
    )


class TestClassification:
    """The SMTP transport decides once whether a failure is about the server or the mail."""

    @pytest.mark.parametrize(
        ("script", "expected"),
        [
            (("rcpt", b"451 4.2.0 try later \xfc"), MailTransientError),
            (("rcpt", b"550 5.1.1 unknown \xfc"), MailPermanentError),
            (("rcpt", b"421 4.3.2 closing"), MailUnavailableError),
            (("mail", b"530 5.7.0 Authentication required"), MailUnavailableError),
            (("data_end", b"421 4.3.2 closing"), MailUnavailableError),
            (("drop", "rcpt"), MailUnavailableError),
            (("drop", "data_end"), MailUnavailableError),
            (("drop", "connect"), MailUnavailableError),
        ],
        ids=lambda value: repr(value)[:30],
    )
    async def test_failure_kinds(
        self,
        raw_server: RawSmtpServer,
        transport: SmtpTransport,
        script: tuple[str, Any],
        expected: type[MailError],
    ) -> None:
        """Only the server's 4xx/5xx answers about a mail count; 421, 53x and drops do not."""
        where, what = script
        if where == "drop":
            raw_server.drop_at(what)
        elif where == "mail":
            raw_server.answer_mail(what)
        elif where == "rcpt":
            raw_server.answer_rcpt("a@example.test", what)
        else:
            raw_server.answer_data_end("a@example.test", what)

        with pytest.raises(MailError) as caught:
            await transport.send(compose("a@example.test"), "a@example.test")

        assert type(caught.value) is expected
        assert is_storable(caught.value.message)

    @pytest.mark.parametrize(
        ("stage", "expected"),
        [
            ("connect", MailUnavailableError),
            ("mail", MailUnavailableError),
            ("rcpt", MailUnavailableError),
            ("data_end", MailTransientError),
        ],
    )
    async def test_silence_counts_only_after_the_recipient_was_accepted(
        self, raw_server: RawSmtpServer, stage: str, expected: type[MailError]
    ) -> None:
        """A server gone quiet is unavailable, unless it went quiet on this very message."""
        raw_server.stall_at(stage)  # type: ignore[arg-type]
        config = SmtpConfig(host=raw_server.host, port=raw_server.port, timeout_seconds=0.5)
        transport = SmtpTransport(config)

        with pytest.raises(MailError) as caught:
            await transport.send(compose("a@example.test"), "a@example.test")
        await transport.aclose()

        assert type(caught.value) is expected

    async def test_connection_refused_is_unavailable(self) -> None:
        """Nothing listening: the server is unavailable, not the mail at fault."""
        with RawSmtpServer() as server:
            config = SmtpConfig(host=server.host, port=server.port, timeout_seconds=2.0)
        transport = SmtpTransport(config)
        with pytest.raises(MailUnavailableError, match="connect"):
            await transport.send(compose("a@example.test"), "a@example.test")
        await transport.aclose()

    async def test_reply_longer_than_a_line_counts_and_is_not_reused(
        self, raw_server: RawSmtpServer, transport: SmtpTransport
    ) -> None:
        """A reply over aiosmtplib's line limit is transient; the connection is not reused."""
        raw_server.answer_rcpt("long@example.test", b"250 " + b"z" * 10_000)

        with pytest.raises(MailTransientError) as caught:
            await transport.send(compose("long@example.test"), "long@example.test")
        await transport.send(compose("a@example.test"), "a@example.test")

        assert not isinstance(caught.value, MailUnavailableError)
        assert len(raw_server.messages) == 1
        assert transport.connections_opened == 2


class TestStoreDataErrors:
    @pytest.mark.parametrize(
        ("statement", "args"),
        [
            ("SELECT '10000-01-01'::timestamptz", ()),
            ("SELECT '0001-01-01 BC'::timestamptz", ()),
            ("SELECT $1::text", ("Zur\udcfcckgewiesen",)),
            ("SELECT $1::text", ("a\x00b",)),
            ("SELECT 1 / 0", ()),
        ],
        ids=["year-10000", "bc", "lone-surrogate", "nul", "division-by-zero"],
    )
    async def test_data_faults_are_store_data_errors(
        self, db: Database, statement: str, args: tuple[str, ...]
    ) -> None:
        """A value the database refuses or Python cannot read is a StoreDataError, never more."""
        with pytest.raises(StoreDataError) as caught, map_errors():
            await db.pool.fetchval(statement, *args)

        assert "\udcfc" not in caught.value.message
        assert await db.pool.fetchval("SELECT 1") == 1
