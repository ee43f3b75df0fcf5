"""NOTIFY on due mail (migrations 0005, 0007) and the LISTEN side that wakes the mail sender.

Notifications arrive in commit order, so "nothing was notified" is checked with a control:
after the statements that must stay quiet, one insert that must notify; exactly one
notification arrives.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

from nproxyd.core.clock import SystemClock
from nproxyd.core.errors import MigrationError
from nproxyd.core.records import MailOutcome
from nproxyd.runtime.listener import MailDueListener
from nproxyd.runtime.metrics import Metrics
from nproxyd.store.database import Database
from nproxyd.store.listener import (
    APPLICATION_NAME,
    MAIL_DUE_CHANNEL,
    listening,
    mail_due_sessions,
)
from nproxyd.store.migrate import available, migrate
from nproxyd.store.stores import OutboxStore

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
WAIT_SECONDS = 5.0
MANY = 1000


async def retry_of_dead_mail_notifies_once(db: Database, inbox: Inbox) -> None:
    """`mail retry` of one dead mail sends exactly one wake-up."""
    await insert_mail(db, "dead-1", status="dead")
    await OutboxStore(db).retry(["dead-1"], NOW)
    await inbox.wait(1)
    assert inbox.received == [""]


class Inbox:
    """Notifications on the mail channel received by a plain LISTEN connection."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.arrived = anyio.Event()

    def __call__(self, _c: object, _pid: int, _channel: str, payload: object) -> None:
        self.received.append(str(payload))
        self.arrived.set()

    async def wait(self, count: int) -> None:
        with anyio.fail_after(WAIT_SECONDS):
            while len(self.received) < count:
                self.arrived = anyio.Event()
                await self.arrived.wait()


@pytest.fixture
async def inbox(dsn: str) -> AsyncIterator[Inbox]:
    connection = await asyncpg.connect(dsn)
    received = Inbox()
    await connection.add_listener(MAIL_DUE_CHANNEL, received)
    yield received
    await connection.close()


async def insert_mail(db: Database, key: str, *, status: str = "pending") -> None:
    """A row with only the contract columns, as another writer would insert it."""
    await db.pool.execute(
        "INSERT INTO mail_outbox (id, status, to_address, subject, body) "
        "VALUES ($1, $2, 'a@example.test', 's', 'b')",
        key,
        status,
    )


class TestTrigger:
    async def test_insert_of_pending_mail_notifies_once_per_statement(
        self, db: Database, inbox: Inbox
    ) -> None:
        """An INSERT of 50 pending rows by another writer sends one notification."""
        await db.pool.execute(
            "INSERT INTO mail_outbox (to_address, subject, body)"
            " SELECT 'a@example.test', 's', 'b' FROM generate_series(1, 50)"
        )
        await inbox.wait(1)
        await anyio.sleep(0.2)
        assert inbox.received == [""]

    async def test_retry_of_dead_mail_notifies(self, db: Database, inbox: Inbox) -> None:
        """`mail retry` (dead back to pending) wakes the senders."""
        await retry_of_dead_mail_notifies_once(db, inbox)

    async def test_senders_own_updates_and_dead_inserts_stay_quiet(
        self, db: Database, inbox: Inbox
    ) -> None:
        """Claiming, extending and recording a retry later, or inserting dead mail, notifies
        nothing (the control insert afterwards is the only notification)."""
        store = OutboxStore(db)
        await db.pool.execute(
            "INSERT INTO mail_outbox (id, to_address, subject, body, next_attempt_at)"
            " VALUES ('m1', 'a@example.test', 's', 'b', $1)",
            NOW,
        )
        await inbox.wait(1)
        claimed = await store.claim(NOW, NOW + timedelta(minutes=2), "me", 10)
        await store.extend([mail.id for mail in claimed], "me", NOW + timedelta(minutes=4))
        later = NOW + timedelta(minutes=5)
        outcome = MailOutcome(id="m1", status="pending", error="451", next_attempt_at=later)
        await store.record([outcome], NOW, "me")
        await insert_mail(db, "dead-2", status="dead")
        await insert_mail(db, "control")
        await inbox.wait(2)
        await anyio.sleep(0.2)
        assert [mail.id for mail in claimed] == ["m1"]
        assert inbox.received == ["", ""]


class TestManyRows:
    async def test_senders_own_updates_of_many_rows_stay_quiet(
        self, db: Database, inbox: Inbox
    ) -> None:
        """Leasing, extending and recording a retry later for 1,000 rows at once notifies
        nothing (the insert before and the control insert after are the only notifications)."""
        store = OutboxStore(db)
        await insert_many(db, MANY, status="pending")
        await inbox.wait(1)
        claimed = await store.claim(NOW, NOW + timedelta(minutes=2), "me", MANY)
        ids = [mail.id for mail in claimed]
        await store.extend(ids, "me", NOW + timedelta(minutes=4))
        later = NOW + timedelta(minutes=5)
        outcomes = [
            MailOutcome(id=key, status="pending", error="451", next_attempt_at=later) for key in ids
        ]
        assert await store.record(outcomes, NOW, "me") == MANY
        await insert_mail(db, "control")
        await inbox.wait(2)
        await anyio.sleep(0.2)
        assert (len(ids), inbox.received) == (MANY, ["", ""])

    async def test_making_many_rows_due_notifies_once_per_transaction(
        self, db: Database, inbox: Inbox
    ) -> None:
        """Two statements in one transaction that make 1,000 dead rows pending and move 1,000
        pending rows earlier send one notification; a second such transaction sends one more."""
        await insert_many(db, MANY, status="dead")
        await insert_many(db, MANY, status="pending", start=MANY, due=NOW + timedelta(days=1))
        await inbox.wait(1)
        for earlier in (NOW + timedelta(hours=1), NOW):
            async with db.pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    "UPDATE mail_outbox SET status = 'pending', next_attempt_at = $1"
                    " WHERE status = 'dead'",
                    NOW,
                )
                moved = await connection.execute(
                    "UPDATE mail_outbox SET next_attempt_at = $1 WHERE next_attempt_at > $1",
                    earlier,
                )
            assert moved == f"UPDATE {MANY}"
        await inbox.wait(3)
        await anyio.sleep(0.2)
        assert inbox.received == ["", "", ""]

    async def test_moving_pending_mail_later_or_to_the_same_time_stays_quiet(
        self, db: Database, inbox: Inbox
    ) -> None:
        """Pending mail whose next_attempt_at moves later or stays, and dead mail changed in
        place, wake nobody (the control insert afterwards is the only notification)."""
        await insert_many(db, MANY, status="dead")
        await db.pool.execute("UPDATE mail_outbox SET last_error = 'x' WHERE status = 'dead'")
        await insert_many(db, MANY, status="pending", start=MANY)
        await inbox.wait(1)
        for shift in (timedelta(hours=1), timedelta(0)):
            await db.pool.execute(
                "UPDATE mail_outbox SET next_attempt_at = next_attempt_at + $1"
                " WHERE status = 'pending'",
                shift,
            )
        await insert_mail(db, "control")
        await inbox.wait(2)
        await anyio.sleep(0.2)
        assert inbox.received == ["", ""]


class TestTriggerCost:
    async def test_update_triggers_are_row_level_with_a_when_clause_and_no_transition_table(
        self, db: Database
    ) -> None:
        """Every UPDATE trigger on mail_outbox fires per row behind a WHEN clause and captures
        no transition table, so its cost follows the rows that wake the senders, linearly."""
        rows = await db.pool.fetch(
            "SELECT tgname, (tgtype & 1) = 1 AS per_row, tgqual IS NOT NULL AS has_when,"
            " tgoldtable IS NULL AND tgnewtable IS NULL AS no_transition_table"
            " FROM pg_trigger WHERE tgrelid = 'mail_outbox'::regclass AND NOT tgisinternal"
            " AND (tgtype & 16) = 16"
        )
        assert [tuple(row.values()) for row in rows] == [
            ("nproxyd_mail_outbox_due_again_row", True, True, True)
        ]

    async def test_a_lease_of_many_rows_runs_no_trigger(self, db: Database) -> None:
        """EXPLAIN ANALYZE of the sender's claim of 1,000 rows shows no trigger call."""
        await insert_many(db, MANY, status="pending")
        plan = json.loads(
            await db.pool.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) UPDATE mail_outbox"
                " SET lease_until = $1, leased_by = 'me' WHERE status = 'pending'",
                NOW,
            )
        )
        leased = await db.pool.fetchval("SELECT count(*) FROM mail_outbox WHERE leased_by = 'me'")
        assert (leased, plan[0].get("Triggers", [])) == (MANY, [])


class TestMigration:
    async def test_rerun_after_0005_ran_again_leaves_only_the_row_trigger(
        self, db: Database, inbox: Inbox
    ) -> None:
        """When 0005 and 0007 run again (their records gone), mail_outbox keeps exactly its
        insert trigger and the row-level update trigger, and a retry still notifies."""
        await db.pool.execute("DELETE FROM nproxyd_schema_migrations WHERE version IN (5, 7)")
        async with db.pool.acquire() as connection:
            assert await migrate(connection) == [5, 7]
        names = await db.pool.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'mail_outbox'::regclass"
            " AND NOT tgisinternal ORDER BY tgname"
        )
        old_function = await db.pool.fetchval(
            "SELECT to_regprocedure('nproxyd_notify_mail_due_again()')"
        )
        assert [row["tgname"] for row in names] == [
            "nproxyd_mail_outbox_due_again_row",
            "nproxyd_mail_outbox_inserted",
        ]
        assert old_function is None
        await retry_of_dead_mail_notifies_once(db, inbox)

    async def test_a_held_table_lock_fails_the_migration_soon_instead_of_queueing(
        self, dsn: str, db: Database
    ) -> None:
        """With 0005's trigger back and a reader holding mail_outbox, 0007 gives up on its
        lock timeout (a MigrationError naming it) rather than waiting behind the reader."""
        (old,) = [m for m in available() if m.version == 5]
        async with db.pool.acquire() as connection, connection.transaction():
            await connection.execute(old.sql)
            await connection.execute("DELETE FROM nproxyd_schema_migrations WHERE version = 7")
        reader = await asyncpg.connect(dsn)
        try:
            async with reader.transaction():
                await reader.execute("LOCK TABLE mail_outbox IN ACCESS SHARE MODE")
                async with db.pool.acquire() as connection:
                    with anyio.fail_after(WAIT_SECONDS), pytest.raises(MigrationError) as caught:
                        await migrate(connection)
        finally:
            await reader.close()
        assert "0007_mail_due_row_trigger" in str(caught.value)
        assert "lock timeout" in str(caught.value)


async def insert_many(
    db: Database, count: int, *, status: str, start: int = 0, due: datetime = NOW
) -> None:
    """``count`` rows in one statement, ids ``m<start>`` onwards, all due at ``due``."""
    await db.pool.execute(
        "INSERT INTO mail_outbox (id, status, to_address, subject, body, next_attempt_at)"
        " SELECT 'm' || g, $1, 'a@example.test', 's', 'b', $2"
        " FROM generate_series($3::int, $3::int + $4::int - 1) AS g",
        status,
        due,
        start,
        count,
    )


class TestListening:
    async def test_listening_calls_back_and_notices_a_terminated_session(
        self, dsn: str, db: Database
    ) -> None:
        """The LISTEN session calls on_notify for a committed insert, and sets `lost` when
        its backend is terminated."""
        calls: list[int] = []
        async with listening(
            dsn, MAIL_DUE_CHANNEL, lambda: calls.append(1), timeout_seconds=5
        ) as session:
            await insert_mail(db, "m1")
            with anyio.fail_after(WAIT_SECONDS):
                while not calls:
                    await anyio.sleep(0.01)
            await db.pool.execute("SELECT pg_terminate_backend($1)", session.backend_pid)
            with anyio.fail_after(WAIT_SECONDS):
                await session.lost.wait()
        assert calls == [1]


class TestMailDueListener:
    async def test_wakes_on_notify_and_reconnects_after_terminate(
        self, dsn: str, db: Database
    ) -> None:
        """The supervised task wakes once on connect and once per notification; after its
        backend is killed it reconnects, sets the gauge again and keeps waking."""
        wakes: list[int] = []
        metrics = Metrics(["mail-sender"])
        listener = MailDueListener(
            mail_due_sessions(dsn, timeout_seconds=5),
            wake=lambda: wakes.append(1),
            clock=SystemClock(),
            metrics=metrics,
            connect_timeout_seconds=5,
        )
        shutdown = anyio.Event()

        async def until(condition: object) -> None:
            with anyio.fail_after(WAIT_SECONDS):
                while not condition():  # type: ignore[operator]
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as group:
            group.start_soon(listener.run, shutdown)
            await until(lambda: listener.connections == 1)
            await insert_mail(db, "m1")
            await until(lambda: len(wakes) == 2)
            await db.pool.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME,
            )
            await until(lambda: listener.connections == 2)
            await insert_mail(db, "m2")
            await until(lambda: len(wakes) == 4)
            connected = metrics.listener_connected.value
            shutdown.set()
        notify_wakeups = metrics.wakeups.labels(source="notify").value
        assert (connected, notify_wakeups) == (1, 4)
        assert metrics.listener_connected.value == 0

    async def test_unreachable_database_is_retried_and_logged_never_raised(self) -> None:
        """With nothing listening at the DSN the task logs listener_connect_failed with growing
        failure counts, keeps the gauge at 0 and returns only at shutdown."""
        logger = RecordingLogger()
        metrics = Metrics(["mail-sender"])
        listener = MailDueListener(
            mail_due_sessions(
                f"postgresql://nproxyd@127.0.0.1:{closed_port()}/nproxy", timeout_seconds=1
            ),
            wake=lambda: None,
            clock=SystemClock(),
            metrics=metrics,
            connect_timeout_seconds=1,
            logger=logger,
        )
        shutdown = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(listener.run, shutdown)
            with anyio.fail_after(WAIT_SECONDS):
                while len(logger.events) < 2:
                    await anyio.sleep(0.05)
            shutdown.set()
        assert [event for event, _ in logger.events[:2]] == ["listener_connect_failed"] * 2
        assert [fields["consecutive_failures"] for _, fields in logger.events[:2]] == [1, 2]
        assert metrics.listener_connected.value == 0
        assert listener.connections == 0


class RecordingLogger:
    """An EventLogger that keeps (event, fields) of warnings."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> RecordingLogger:
        return self

    def debug(self, event: str, **kw: Any) -> None:
        pass

    def info(self, event: str, **kw: Any) -> None:
        pass

    def warning(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    def error(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


def closed_port() -> int:
    """A TCP port nothing listens on (bound a moment ago, then released)."""
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
