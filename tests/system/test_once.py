"""``nproxyd once`` on seeded rows, and the embedded PostgreSQL, through the real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from tests import seed
from tests.system.proc import (
    Processes,
    free_port,
    json_lines,
    nproxyd_env,
    run_nproxyd,
    wait_ready,
    wait_until,
)

pytestmark = [pytest.mark.system, pytest.mark.anyio]

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Postmaster:
    """The running server of a data directory, from its ``postmaster.pid``."""

    pid: int
    port: int
    socket_dir: str

    @classmethod
    def read(cls, pgdata: Path) -> Postmaster:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return cls(pid=int(lines[0]), port=int(lines[3]), socket_dir=lines[4])

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True


async def seed_due_invoices(dsn: str, *, count: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        user = await seed.user(connection, "u1")
        for number in range(count):
            await seed.invoice(
                connection, f"due{number}", user_id=user, expires_at=NOW - timedelta(1)
            )
    finally:
        await connection.close()


class TestOnce:
    async def test_expirer_once_expires_seeded_rows_and_prints_one_json_line(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """`once invoice-expirer --now` expires what is due at that time and reports it."""
        connection = await asyncpg.connect(dsn)
        try:
            user = await seed.user(connection, "u1")
            await seed.invoice(connection, "due", user_id=user, expires_at=NOW - timedelta(1))
            await seed.invoice(connection, "later", user_id=user, expires_at=NOW + timedelta(1))
        finally:
            await connection.close()

        result = run_nproxyd(
            ["once", "invoice-expirer", "--now", "2026-03-10T12:00:00Z"],
            nproxyd_env(dsn=dsn, state_dir=tmp_path),
        )

        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1
        assert json.loads(lines[0]) == {
            "actor": "invoice-expirer",
            "expired_count": 1,
            "batches": 1,
        }
        connection = await asyncpg.connect(dsn)
        try:
            rows = await connection.fetch("SELECT id, status FROM payment_invoices ORDER BY id")
        finally:
            await connection.close()
        assert [(r["id"], r["status"]) for r in rows] == [("due", "expired"), ("later", "pending")]

    async def test_key_pool_once_recovers_cooled_down_keys(self, dsn: str, tmp_path: Path) -> None:
        """`once key-pool-recoverer --now` returns due cooldown keys to active."""
        connection = await asyncpg.connect(dsn)
        try:
            await seed.key(
                connection,
                "k1",
                status="cooldown",
                failures=1,
                cooldown_until=NOW - timedelta(minutes=1),
            )
        finally:
            await connection.close()

        result = run_nproxyd(
            ["once", "key-pool-recoverer", "--now", "2026-03-10T12:00:00Z"],
            nproxyd_env(dsn=dsn, state_dir=tmp_path),
        )

        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["recovered_count"] == 1
        assert report["balance_checked_count"] == 1

    def test_bad_now_is_a_command_line_error(self, tmp_path: Path) -> None:
        """An unparseable --now exits 64 without touching the database."""
        result = run_nproxyd(
            ["once", "invoice-expirer", "--now", "yesterday"],
            nproxyd_env(dsn="postgresql://nobody@127.0.0.1:1/x", state_dir=tmp_path),
        )
        assert result.returncode == 64
        assert "ISO-8601" in result.stderr


class TestEmbeddedPostgres:
    def test_two_processes_share_one_embedded_server(self, tmp_path: Path) -> None:
        """Processes on one state directory run on the one embedded server a daemon started:
        its database, its postmaster (still running after they exit), no second data
        directory; the last process out stops it."""
        state = tmp_path / "state"
        port = free_port()
        settings: dict[str, object] = {
            "http.listen": f"127.0.0.1:{port}",
            "email.maildir.path": tmp_path / "mail",
        }
        # The daemon does not expire invoices itself: only the `once` processes do.
        daemon_env = nproxyd_env(
            dsn="", state_dir=state, settings={**settings, "actors.invoice_expirer.enabled": False}
        )
        once_env = nproxyd_env(dsn="", state_dir=state, settings=settings)
        processes = Processes(tmp_path / "logs")
        try:
            daemon = processes.start(["run"], daemon_env)
            wait_ready(processes, daemon, f"http://127.0.0.1:{port}", timeout=90)
            postmaster = Postmaster.read(state / "postgres")
            asyncio.run(seed_due_invoices(postmaster.dsn("nproxyd"), count=3))

            started = [processes.start(["once", "invoice-expirer"], once_env) for _ in range(2)]
            reports = []
            for process in started:
                code, stdout, stderr = processes.finish(process, timeout=90)
                assert code == 0, stderr[-3000:]
                [report] = json_lines(stdout)
                reports.append(report)

            # Both expired the invoices seeded in the daemon's database, between them.
            assert sum(report["expired_count"] for report in reports) == 3
            assert Postmaster.read(state / "postgres").pid == postmaster.pid
            assert postmaster.alive()
            assert sorted(path.parent for path in tmp_path.rglob("postgresql.conf")) == [
                state / "postgres"
            ]

            daemon.send_signal(signal.SIGTERM)
            assert processes.finish(daemon, timeout=60)[0] == 0
            wait_until(lambda: not postmaster.alive(), timeout=30, what="the server to stop")
        finally:
            processes.kill_all()
