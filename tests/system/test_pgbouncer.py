"""The real daemon behind a real PgBouncer in transaction mode (``database.pooler = pgbouncer``).

PgBouncer runs with ``default_pool_size`` smaller than instances x ``pool_max_size``, so server
connections really are shared between clients from one transaction to the next: a prepared
statement, a session setting or a session lock would land on someone else's connection.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from nproxyd.store.migrate import available
from tests.fakes.smtp import FakeSmtpServer
from tests.pg import TestServer, database_name, with_database
from tests.pgbouncer import DEFAULT_POOL_SIZE, PgBouncer
from tests.system.proc import (
    Processes,
    free_port,
    http_get,
    http_status,
    json_lines,
    nproxyd_env,
    quiet,
    sql,
    wait_ready,
    wait_until,
)
from tests.system.test_chaos import seed_due_subscriptions
from tests.system.test_listener import delivered, insert_mail

pytestmark = pytest.mark.system

INSTANCES = 4
POOL_MAX_SIZE = 4
DUE = 500
# What a session feature used through a transaction pooler looks like when it breaks.
POOLER_ERRORS = re.compile(
    r"prepared statement|08P01|26000|42P05|ProtocolViolation|InvalidSQLStatementName|"
    r"unsupported startup parameter|DuplicatePreparedStatement|advisory",
    re.IGNORECASE,
)


@pytest.fixture
def smtp() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer() as server:
        yield server


def pooled_env(
    pgbouncer: PgBouncer,
    dsn: str,
    state_dir: Path,
    smtp: FakeSmtpServer,
    port: int,
    **settings: object,
) -> dict[str, str]:
    return nproxyd_env(
        dsn=pgbouncer.dsn(database_name(dsn)),
        state_dir=state_dir,
        settings={
            "database.pooler": "pgbouncer",
            "database.pool_max_size": POOL_MAX_SIZE,
            "http.listen": f"127.0.0.1:{port}",
            "email.transport": "smtp",
            "email.smtp.host": smtp.host,
            "email.smtp.port": smtp.port,
            **settings,
        },
    )


def log_events(processes: Processes, process: subprocess.Popen[bytes], name: str) -> int:
    stdout, _ = processes.output(process)
    return sum(1 for line in json_lines(stdout) if line.get("event") == name)


def pooler_errors(processes: Processes) -> list[str]:
    found = []
    for process in processes.started:
        stdout, stderr = processes.output(process)
        found += [line for line in (stdout + stderr).splitlines() if POOLER_ERRORS.search(line)]
    return found


class TestBehindPgBouncer:
    def test_direct_dsn_keeps_notify_wakeups_behind_the_pooler(
        self,
        pgbouncer: PgBouncer,
        system_dsn: str,
        tmp_path: Path,
        smtp: FakeSmtpServer,
        processes: Processes,
    ) -> None:
        """Pooled DSN through PgBouncer, direct_dsn for LISTEN: a mail inserted by another
        connection is delivered within 5 s with the sweep at 3600 s, and nothing logs a
        pooler error."""
        port = free_port()
        env = pooled_env(
            pgbouncer,
            system_dsn,
            tmp_path / "state",
            smtp,
            port,
            **{"database.direct_dsn": system_dsn, "actors.mail_sender.interval_seconds": 3600},
        )
        process = processes.start(["run"], env)
        wait_ready(processes, process, f"http://127.0.0.1:{port}", timeout=20)
        wait_until(lambda: log_events(processes, process, "listener_connected") == 1, timeout=10)
        time.sleep(0.5)
        insert_mail(system_dsn, 1)
        wait_until(lambda: delivered(smtp, 1), timeout=5, what="mail delivered")
        assert pooler_errors(processes) == []

    def test_without_direct_dsn_one_warning_and_the_sweep_still_delivers(
        self,
        pgbouncer: PgBouncer,
        system_dsn: str,
        tmp_path: Path,
        smtp: FakeSmtpServer,
        processes: Processes,
    ) -> None:
        """Behind PgBouncer without direct_dsn the listener is off with one warning at start
        (and null in /status); the daemon is ready and its sweep delivers mail."""
        port = free_port()
        env = pooled_env(
            pgbouncer,
            system_dsn,
            tmp_path / "state",
            smtp,
            port,
            **{"actors.mail_sender.interval_seconds": 0.5},
        )
        process = processes.start(["run"], env)
        wait_ready(processes, process, f"http://127.0.0.1:{port}", timeout=20)
        insert_mail(system_dsn, 1)
        wait_until(lambda: delivered(smtp, 1), timeout=10, what="mail delivered by the sweep")
        _, body = http_get(f"http://127.0.0.1:{port}/status")
        assert log_events(processes, process, "listener_disabled") == 1
        assert json.loads(body)["listener"] is None
        assert log_events(processes, process, "listener_connected") == 0
        assert pooler_errors(processes) == []

    @pytest.mark.anyio
    async def test_concurrent_migrations_through_pgbouncer_apply_each_version_once(
        self, pgbouncer: PgBouncer, pg_server: TestServer, tmp_path: Path
    ) -> None:
        """Three `nproxyd migrate` through PgBouncer without direct_dsn on an empty database,
        held back by the migration lock until all have started: all exit 0, each version is
        applied once."""
        from nproxyd.store.migrate import _LOCK_KEY  # noqa: PLC0415

        name = f"nproxyd_pgb_migrate_{int(time.time() * 1000)}"
        admin = await asyncpg.connect(pg_server.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        holder = await asyncpg.connect(with_database(pg_server.admin_dsn, name))
        processes = Processes(tmp_path / "logs")
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            env = nproxyd_env(
                dsn=pgbouncer.dsn(name),
                state_dir=tmp_path / "state",
                settings={"database.pooler": "pgbouncer"},
            )
            started = [processes.start(["migrate"], env) for _ in range(3)]
            await anyio.sleep(3)  # every migrator is polling for the lock by now
            await holder.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
            results = [processes.finish(process, timeout=40) for process in started]
            rows = await holder.fetch(
                "SELECT version, count(*) AS n FROM nproxyd_schema_migrations GROUP BY version"
            )
        finally:
            processes.kill_all()
            await holder.close()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        for code, _, stderr in results:
            assert code == 0, stderr[-3000:]
        assert {row["version"]: row["n"] for row in rows} == {m.version: 1 for m in available()}


def chaos_env(
    pgbouncer: PgBouncer, dsn: str, tmp_path: Path, smtp: FakeSmtpServer, name: str, port: int
) -> dict[str, str]:
    return pooled_env(
        pgbouncer,
        dsn,
        tmp_path / name,
        smtp,
        port,
        **{
            "database.direct_dsn": dsn,
            "daemon.instance_id": name,
            "billing.claim_lease_seconds": 1,
            "billing.retry_base_seconds": 0.2,
            "billing.retry_max_seconds": 1,
            "billing.provider_concurrency": 8,
            "payment.simulated.latency_ms": 20,
            "payment.simulated.failure_rate": 0.3,
            "actors.renewal_scheduler.interval_seconds": 0.5,
            "actors.renewal_scheduler.batch_size": 50,
            "actors.mail_sender.interval_seconds": 2,
            "actors.mail_sender.lease_seconds": 1,
            "actors.mail_sender.retry_base_seconds": 0.2,
            "actors.mail_sender.retry_max_seconds": 1,
            "actors.mail_sender.max_attempts": 50,
            "email.smtp.timeout_seconds": 2,
            "email.smtp.max_connections": 2,
        },
    )


class TestChaosBehindPgBouncer:
    def test_four_instances_kill9_flaky_provider_through_pgbouncer(
        self, pgbouncer: PgBouncer, system_dsn: str, tmp_path: Path, smtp: FakeSmtpServer
    ) -> None:
        """Four instances through PgBouncer (fewer server connections than their pools), a
        flaky provider and SIGKILLs: one invoice and one sent mail per subscription, every
        daemon ready, and no pooler error in any log."""
        assert INSTANCES * POOL_MAX_SIZE > DEFAULT_POOL_SIZE
        dsn = system_dsn
        seed_due_subscriptions(dsn, DUE)
        rng = random.Random(20261201)
        processes = Processes(tmp_path / "logs")
        ports = {f"i{n}": free_port() for n in range(INSTANCES)}
        envs = {
            name: chaos_env(pgbouncer, dsn, tmp_path, smtp, name, port)
            for name, port in ports.items()
        }
        running: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in ports:
                running[name] = processes.start(["run"], envs[name])
            for _ in range(12):
                time.sleep(rng.uniform(0.2, 1.0))
                victim = rng.choice(sorted(running))
                processes.kill(running[victim])
                running[victim] = processes.start(["run"], envs[victim])
            wait_until(
                lambda: quiet(dsn, DUE), timeout=60, interval=0.25, what="the work to finish"
            )
            for name, process in running.items():
                wait_ready(processes, process, f"http://127.0.0.1:{ports[name]}", timeout=20)
            ready = {
                name: http_status(f"http://127.0.0.1:{port}/readyz") for name, port in ports.items()
            }
            errors = pooler_errors(processes)
        finally:
            processes.kill_all()

        assert ready == dict.fromkeys(ports, 200)
        assert errors == []
        per_subscription = sql(
            dsn, "SELECT subscription_id, count(*) AS n FROM payment_invoices GROUP BY 1"
        )
        assert len(per_subscription) == DUE
        assert {row["n"] for row in per_subscription} == {1}
        mails = sql(
            dsn,
            "SELECT i.id, count(m.id) AS n, bool_and(m.status = 'sent') AS sent"
            " FROM payment_invoices i LEFT JOIN mail_outbox m"
            " ON m.dedupe_key = 'renewal-invoice:' || i.id GROUP BY i.id",
        )
        assert {row["n"] for row in mails} == {1}
        assert all(row["sent"] for row in mails)
        delivered_ids = {message.headers["Message-ID"] for message in smtp.messages}
        sent_ids = {row["message_id"] for row in sql(dsn, "SELECT message_id FROM mail_outbox")}
        assert sent_ids <= delivered_ids
