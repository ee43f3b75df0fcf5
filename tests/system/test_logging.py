"""The real ``nproxyd`` process logs only JSON lines, also while PostgreSQL is gone under it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from nproxyd import __version__
from tests.system.proc import (
    Processes,
    ThrowawayPostgres,
    free_port,
    http_status,
    nproxyd_env,
    run_nproxyd,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system


def non_json_lines(text: str) -> list[str]:
    """Every non-empty line of *text* that is not one JSON object."""
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(parsed, dict):
            bad.append(line)
    return bad


def parsed(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class TestLogsWithPostgresDown:
    def test_every_line_is_json_while_postgres_is_stopped_under_the_daemon(
        self, processes: Processes, tmp_path: Path
    ) -> None:
        """PostgreSQL stopped and started under a debug-level daemon: stdout and stderr hold
        only JSON lines (library tracebacks included), daemon_started names the set-up without
        the DSN, debug events appear and failed ticks are warnings."""
        postgres = ThrowawayPostgres()
        try:
            postgres.init()
            postgres.start()
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            env = nproxyd_env(
                dsn=postgres.dsn,
                state_dir=tmp_path / "state",
                settings={
                    "http.listen": f"127.0.0.1:{port}",
                    "email.transport": "maildir",
                    "email.maildir.path": tmp_path / "maildir",
                    "daemon.instance_id": "logging-test",
                    "log.level": "debug",
                    "database.connect_timeout_seconds": 2,
                    "actors.invoice_expirer.interval_seconds": 0.5,
                    "actors.renewal_scheduler.interval_seconds": 0.5,
                    "actors.mail_sender.interval_seconds": 0.5,
                    "actors.key_pool_recoverer.interval_seconds": 0.5,
                },
            )
            migrated = run_nproxyd(["migrate"], env, timeout=25)
            assert migrated.returncode == 0, migrated.stderr
            process = processes.start(["run"], env)
            wait_ready(processes, process, base_url)

            postgres.stop("fast")
            wait_until(lambda: http_status(base_url + "/readyz") == 503, timeout=10, what="503")
            time.sleep(3)  # failed ticks, pool reconnects and their library logs
            postgres.start()
            wait_until(
                lambda: http_status(base_url + "/readyz") == 200, timeout=30, what="200 again"
            )
            process.send_signal(signal.SIGTERM)
            code, stdout, stderr = processes.finish(process, timeout=15)
        finally:
            processes.kill_all()
            postgres.cleanup()

        assert code == 0, stderr[-3000:]
        assert non_json_lines(stdout) == []
        assert non_json_lines(stderr) == []
        lines = parsed(stdout)
        started = [line for line in lines if line["event"] == "daemon_started"]
        assert len(started) == 1
        assert started[0]["version"] == __version__
        assert started[0]["instance_id"] == "logging-test"
        assert started[0]["state_dir"] == str(tmp_path / "state")
        assert started[0]["database"] == "external"
        assert started[0]["database_host"] == "127.0.0.1"
        assert started[0]["payment_provider"] == "simulated"
        assert started[0]["mail_transport"] == "maildir"
        assert started[0]["migrations"] == "up to date"
        assert postgres.dsn not in stdout
        assert any(line["level"] == "debug" for line in lines)
        failed = [line for line in lines if line["event"] == "tick_failed"]
        assert failed
        assert {line["level"] for line in failed} == {"warning"}
        not_ready = [line for line in lines if line["event"] == "daemon_not_ready"]
        assert not_ready
        assert "database_unreachable" in not_ready[0]["reasons"]
