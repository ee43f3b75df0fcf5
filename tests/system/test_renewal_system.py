"""Renewal invoices through the real ``nproxyd`` process: once, several instances, kill -9.

docs/design.md §2 "Renewal invoices" and §3 invariants 1, 2 and 4, with ``nproxyd once
renewal-scheduler`` run as a subprocess against a real PostgreSQL.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

from tests import seed
from tests.fakes.nowpayments import FakeNowPayments, Mode
from tests.renewal_checks import (
    NOW,
    PERIOD_END,
    PERIOD_START,
    assert_renewal_invariants,
    automatic_invoices,
    seed_due,
)
from tests.system.proc import Processes, json_lines, nproxyd_env

pytestmark = [pytest.mark.system, pytest.mark.anyio]

NOW_ARG = "2026-03-09T12:00:00Z"
# Well after a one-second claim lease taken at NOW_ARG, still before the period ends.
AFTER_LEASE_ARG = "2026-03-09T12:00:30Z"
# After the default 120 s lease (whose heartbeat never fires within the test).
AFTER_LONG_LEASE_ARG = "2026-03-09T12:10:00Z"
APP_BASE_URL = "https://app.nproxy.example"


def renewal_env(
    dsn: str, tmp_path: Path, settings: dict[str, object] | None = None
) -> dict[str, str]:
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "email.transport": "maildir",
            "email.maildir.path": str(tmp_path / "maildir"),
            "urls.app_base_url": APP_BASE_URL,
            **(settings or {}),
        },
    )


@asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def once_renewal(
    processes: Processes, env: dict[str, str], now: str = NOW_ARG, timeout: float = 25.0
) -> dict[str, Any]:
    """Run ``nproxyd once renewal-scheduler --now NOW``; returns its one-line JSON report."""
    process = processes.start(["once", "renewal-scheduler", "--now", now], env)
    code, stdout, stderr = await anyio.to_thread.run_sync(
        lambda: processes.finish(process, timeout=timeout)
    )
    assert code == 0, stderr[-4000:]
    assert len(stdout.splitlines()) == 1, stdout
    [report] = json_lines(stdout)
    assert report["actor"] == "renewal-scheduler"
    return report


async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    what: str,
    processes: Processes,
    process: subprocess.Popen[bytes],
    timeout: float = 20.0,
) -> None:
    """Poll ``check`` until it holds; fails early when ``process`` has exited meanwhile."""
    deadline = anyio.current_time() + timeout
    while not await check():
        if process.poll() is not None:
            stdout, stderr = processes.output(process)
            raise AssertionError(
                f"nproxyd exited {process.returncode} while waiting for {what}\n"
                f"{stderr[-3000:]}\n{stdout[-1000:]}"
            )
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.02)


async def kill_9(processes: Processes, process: subprocess.Popen[bytes]) -> None:
    assert process.poll() is None, "nproxyd finished before it could be killed"
    processes.kill(process)
    code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=10))
    assert code == -9


async def end_backends(watcher: asyncpg.Connection, timeout: float = 20.0) -> None:
    """Terminate the nproxyd backends of the test database, and wait until none is left.

    ``watcher`` must be outside any transaction, so that each read lists the backends of now.
    pg_terminate_backend only signals: a backend is gone once pg_stat_activity lists it no
    more, and its transaction was rolled back before that. A backend not listed yet (still
    starting) has not told its client it is ready, so it holds no statement to run.
    """
    with anyio.fail_after(timeout):
        while await watcher.fetch(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'nproxyd'"
        ):
            await anyio.sleep(0.01)


async def scalar(dsn: str, query: str, *args: Any) -> Any:
    async with connected(dsn) as connection:
        return await connection.fetchval(query, *args)


async def claimed_count(dsn: str) -> int:
    value: int = await scalar(
        dsn, "SELECT count(*) FROM nproxyd_renewal_claims WHERE state = 'claimed'"
    )
    return value


async def assert_one_invoice_and_mail_each(dsn: str, subscription_ids: list[str]) -> None:
    """Every subscription has exactly one automatic invoice, each with exactly one mail."""
    async with connected(dsn) as connection:
        invoices = await automatic_invoices(connection)
        mails = await connection.fetchval(
            "SELECT count(*) FROM mail_outbox WHERE dedupe_key LIKE 'renewal-invoice:%'"
        )
        await assert_renewal_invariants(connection)
    per_subscription: dict[str, int] = {}
    for row in invoices:
        per_subscription[row["subscription_id"]] = (
            per_subscription.get(row["subscription_id"], 0) + 1
        )
    assert per_subscription == dict.fromkeys(subscription_ids, 1)
    assert mails == len(subscription_ids)


class TestOnce:
    async def test_worked_example_through_the_cli(
        self, dsn: str, tmp_path: Path, processes: Processes
    ) -> None:
        """`once renewal-scheduler --now` creates the worked example's invoice once, then none."""
        async with connected(dsn) as connection:
            await seed.plan(connection, price=Decimal("29.00"), currency="USDT")
            await seed.subscription(
                connection, "sub_1", period_start=PERIOD_START, period_end=PERIOD_END
            )
        env = renewal_env(dsn, tmp_path)

        first = await once_renewal(processes, env)
        second = await once_renewal(processes, env)

        assert (first["created_count"], second["created_count"]) == (1, 0)
        async with connected(dsn) as connection:
            [invoice] = await automatic_invoices(connection)
            [mail] = await connection.fetch("SELECT * FROM mail_outbox")
        assert invoice["subscription_id"] == "sub_1"
        assert (invoice["amount_usd"], invoice["amount_crypto"]) == (Decimal(29), Decimal(29))
        assert (invoice["currency"], invoice["status"]) == ("USDT", "pending")
        assert invoice["expires_at"] == NOW + timedelta(hours=24)
        assert mail["dedupe_key"] == f"renewal-invoice:{invoice['id']}"
        assert mail["subject"] == "Your nproxy subscription renewal invoice"
        assert mail["body"] == (
            "Your current subscription period is ending soon.\n"
            "Current access ends at 2026-03-12T11:00:00.000Z.\n"
            "Invoice amount: 29 USDT.\n"
            f"Payment address: {invoice['payment_address']}.\n"
            "Invoice expires at 2026-03-10T12:00:00.000Z.\n"
            "Open billing: https://app.nproxy.example/billing"
        )
        await assert_one_invoice_and_mail_each(dsn, ["sub_1"])


class TestSeveralInstances:
    async def test_three_processes_create_each_invoice_once(
        self, dsn: str, tmp_path: Path, processes: Processes
    ) -> None:
        """Three concurrent `once` runs over 300 due rows create 300 invoices and 300 mails."""
        async with connected(dsn) as connection:
            await seed.plan(connection)
            subscription_ids = await seed_due(connection, 300)
        env = renewal_env(
            dsn,
            tmp_path,
            {
                "payment.simulated.latency_ms": 20,
                # Small batches keep the three runs interleaved instead of one taking all.
                "actors.renewal_scheduler.batch_size": 20,
            },
        )
        started = [
            processes.start(["once", "renewal-scheduler", "--now", NOW_ARG], env) for _ in range(3)
        ]
        reports = []
        for process in started:
            code, stdout, stderr = await anyio.to_thread.run_sync(
                functools.partial(processes.finish, process, timeout=25)
            )
            assert code == 0, stderr[-4000:]
            [report] = json_lines(stdout)
            reports.append(report)

        assert sum(report["created_count"] for report in reports) == 300
        # A slot is claimed by one process only, so no provider invoice was asked for twice.
        assert sum(report["claimed"] for report in reports) == 300
        await assert_one_invoice_and_mail_each(dsn, subscription_ids)


class TestKill9:
    async def test_kill_between_claim_and_provider_answer(
        self, dsn: str, tmp_path: Path, processes: Processes
    ) -> None:
        """After kill -9 during the provider calls, a later run creates each invoice once."""
        async with connected(dsn) as connection:
            await seed.plan(connection)
            subscription_ids = await seed_due(connection, 5)
        slow = renewal_env(
            dsn,
            tmp_path,
            {"payment.simulated.latency_ms": 10_000, "billing.claim_lease_seconds": 1},
        )
        victim = processes.start(["once", "renewal-scheduler", "--now", NOW_ARG], slow)

        async def all_claimed() -> bool:
            return await claimed_count(dsn) == 5

        await eventually(all_claimed, what="5 claims", processes=processes, process=victim)
        await kill_9(processes, victim)
        assert await scalar(dsn, "SELECT count(*) FROM payment_invoices") == 0

        healthy = renewal_env(dsn, tmp_path, {"billing.claim_lease_seconds": 1})
        within_lease = await once_renewal(processes, healthy, now=NOW_ARG)
        assert (within_lease["claimed"], within_lease["created_count"]) == (0, 0)

        report = await once_renewal(processes, healthy, now=AFTER_LEASE_ARG)

        assert (report["claimed"], report["created_count"]) == (5, 5)
        await assert_one_invoice_and_mail_each(dsn, subscription_ids)
        attempts = await scalar(
            dsn, "SELECT array_agg(DISTINCT attempts) FROM nproxyd_renewal_claims"
        )
        assert attempts == [2]

    async def test_kill_between_provider_answer_and_commit(
        self, dsn: str, tmp_path: Path, processes: Processes
    ) -> None:
        """After kill -9 with provider answers not yet committed, each invoice is stored once."""
        async with connected(dsn) as connection:
            await seed.plan(connection)
            subscription_ids = await seed_due(connection, 3)
        fake = FakeNowPayments(hang_seconds=3.0)
        with fake.running_in_thread():
            env = renewal_env(
                dsn,
                tmp_path,
                {
                    "billing.payment_provider": "nowpayments",
                    "payment.nowpayments.api_base_url": fake.url,
                    "payment.nowpayments.api_key": fake.api_key,
                    "billing.claim_lease_seconds": 120,
                },
            )
            # The fake answers only after hang_seconds: time to lock the claims before the
            # answers arrive, so the commit that follows them blocks.
            fake.set_mode(Mode.HANG)
            victim = processes.start(["once", "renewal-scheduler", "--now", NOW_ARG], env)
            await self._kill_while_committing(dsn, fake, processes, victim)
            assert await scalar(dsn, "SELECT count(*) FROM payment_invoices") == 0
            assert await scalar(dsn, "SELECT count(*) FROM mail_outbox") == 0

            fake.set_mode(Mode.OK)
            report = await once_renewal(processes, env, now=AFTER_LONG_LEASE_ARG)

        assert report["created_count"] == 3
        await assert_one_invoice_and_mail_each(dsn, subscription_ids)
        async with connected(dsn) as connection:
            rows = await connection.fetch(
                "SELECT c.order_id, i.provider_invoice_id FROM nproxyd_renewal_claims AS c"
                " JOIN payment_invoices AS i ON i.id = c.invoice_id"
            )
        assert len(rows) == 3
        for row in rows:
            # The provider made two payments for the slot (a duplicate is expected after a
            # crash); the order_id makes them recognisable, and only the last is stored.
            payments = [p for p in fake.payments if p["order_id"] == row["order_id"]]
            assert fake.calls_for(row["order_id"]) == 2
            assert len(payments) == 2
            assert row["provider_invoice_id"] == payments[-1]["payment_id"]

    @staticmethod
    async def _kill_while_committing(
        dsn: str, fake: FakeNowPayments, processes: Processes, victim: subprocess.Popen[bytes]
    ) -> None:
        # pg_stat_activity is read on a connection of its own, outside any transaction: within
        # one (the locker's) it is a snapshot taken at its first read, without the backends
        # that connect later, such as the second committer's.
        locker = await asyncpg.connect(dsn)
        watcher = await asyncpg.connect(dsn)
        try:

            async def all_claimed() -> bool:
                return await claimed_count(dsn) == 3

            await eventually(all_claimed, what="3 claims", processes=processes, process=victim)
            transaction = locker.transaction()
            await transaction.start()
            locked = await locker.fetch("SELECT * FROM nproxyd_renewal_claims FOR UPDATE")
            assert len(locked) == 3

            async def answered() -> bool:
                return len(fake.payments) == 3

            async def commit_blocked() -> bool:
                # pg_stat_activity.query is not reliable for asyncpg's prepared statements;
                # with the long lease no heartbeat runs, so the commit is the only writer.
                waiting: int = await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'nproxyd' AND $1 = ANY (pg_blocking_pids(pid))",
                    locker.get_server_pid(),
                )
                return waiting > 0

            await eventually(
                answered, what="3 provider payments", processes=processes, process=victim
            )
            await eventually(
                commit_blocked, what="the commit to wait", processes=processes, process=victim
            )
            await kill_9(processes, victim)
            # The server would still finish a statement the dead client sent (blocked on the
            # lock or not) once the lock is free: its backends must be gone first.
            await end_backends(watcher)
            await transaction.rollback()
        finally:
            await watcher.close()
            await locker.close()
