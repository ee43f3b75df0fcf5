"""``nproxyd once`` on seeded rows, and the embedded PostgreSQL, through the real process."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from tests import seed
from tests.system.proc import NPROXYD, REPO_ROOT, nproxyd_env, run_nproxyd

pytestmark = [pytest.mark.system, pytest.mark.anyio]

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


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
        """Without a DSN, two processes on one state directory both run on one embedded server."""
        env = nproxyd_env(dsn="", state_dir=tmp_path / "state")
        env["NPROXYD__EMAIL__MAILDIR__PATH"] = str(tmp_path / "mail")
        processes = [
            subprocess.Popen(
                [*NPROXYD, "once", "invoice-expirer"],
                env=env,
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=90) for process in processes]
        assert [process.returncode for process in processes] == [0, 0], outputs
        for stdout, _ in outputs:
            assert json.loads(stdout)["actor"] == "invoice-expirer"
        assert (tmp_path / "state" / "postgres" / "PG_VERSION").exists()
        again = run_nproxyd(["once", "key-pool-recoverer"], env, timeout=90)
        assert again.returncode == 0, again.stderr
