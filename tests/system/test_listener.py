"""NOTIFY wake-ups under the real daemon: mail written by another process goes out at once.

With the mail sender's sweep set to an hour, only the LISTEN session can explain a delivery
within seconds. Killing that session's backend must not stop it: the daemon reconnects.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.smtp import FakeSmtpServer
from tests.system.proc import (
    Processes,
    free_port,
    http_get,
    json_lines,
    nproxyd_env,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system

DELIVERY_TIMEOUT_SECONDS = 5.0
LISTENER = "nproxyd-listener"


@pytest.fixture
def smtp() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer() as server:
        yield server


def listener_env(
    dsn: str, tmp_path: Path, smtp: FakeSmtpServer, port: int, **settings: object
) -> dict[str, str]:
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "http.listen": f"127.0.0.1:{port}",
            "actors.mail_sender.interval_seconds": 3600,
            "email.transport": "smtp",
            "email.smtp.host": smtp.host,
            "email.smtp.port": smtp.port,
            **settings,
        },
    )


def insert_mail(dsn: str, index: int) -> None:
    """One due mail with only the contract columns, as another writer (psql) would."""
    sql(
        dsn,
        "INSERT INTO mail_outbox (to_address, subject, body, message_id)"
        " VALUES ($1, 'Hello', 'Body', $2)",
        f"user{index}@example.test",
        message_id(index),
    )


def message_id(index: int) -> str:
    return f"<listener-{index}@nproxy.localhost>"


def delivered(smtp: FakeSmtpServer, index: int) -> bool:
    return any(m.headers.get("Message-ID") == message_id(index) for m in smtp.messages)


def events(
    processes: Processes, process: subprocess.Popen[bytes], name: str
) -> list[dict[str, object]]:
    stdout, _ = processes.output(process)
    return [line for line in json_lines(stdout) if line.get("event") == name]


def notify_wakeups(port: int) -> float:
    """``nproxyd_wakeups_total{source="notify"}`` of the daemon on ``port`` (0 before any)."""
    _, metrics = http_get(f"http://127.0.0.1:{port}/metrics")
    prefix = 'nproxyd_wakeups_total{source="notify"} '
    values = [line[len(prefix) :] for line in metrics.splitlines() if line.startswith(prefix)]
    return float(values[0]) if values else 0.0


def start_daemon(processes: Processes, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    process = processes.start(["run"], env)
    wait_ready(processes, process, f"http://127.0.0.1:{port}", timeout=20)
    wait_until(
        lambda: bool(events(processes, process, "listener_connected")),
        timeout=10,
        what="listener_connected",
    )
    return process


class TestNotifyWakeups:
    def test_mail_from_another_writer_is_delivered_long_before_the_sweep(
        self, system_dsn: str, tmp_path: Path, smtp: FakeSmtpServer, processes: Processes
    ) -> None:
        """With the sweep at 3600 s, a mail inserted by another connection arrives within 5 s;
        /metrics and /status show the listener connected and its wake-ups (connect + insert)."""
        port = free_port()
        start_daemon(processes, listener_env(system_dsn, tmp_path, smtp, port), port)
        wait_until(  # the catch-up wake-up of the connect is over, however slow the machine
            lambda: notify_wakeups(port) == 1.0, timeout=10, what="the catch-up wake-up"
        )
        insert_mail(system_dsn, 1)
        wait_until(
            lambda: delivered(smtp, 1), timeout=DELIVERY_TIMEOUT_SECONDS, what="mail 1 delivered"
        )
        status = sql(system_dsn, "SELECT status FROM mail_outbox")
        _, metrics = http_get(f"http://127.0.0.1:{port}/metrics")
        _, body = http_get(f"http://127.0.0.1:{port}/status")
        assert [row["status"] for row in status] == ["sent"]
        assert json.loads(body)["listener"] == {"connected": True, "connections": 1}
        assert "nproxyd_listener_connected 1.0" in metrics
        assert 'nproxyd_wakeups_total{source="notify"} 2.0' in metrics

    def test_listener_reconnects_after_its_backend_is_terminated(
        self, system_dsn: str, tmp_path: Path, smtp: FakeSmtpServer, processes: Processes
    ) -> None:
        """pg_terminate_backend on the LISTEN session: listener_lost, listener_connected again,
        and a mail inserted afterwards still arrives within 5 s."""
        port = free_port()
        process = start_daemon(processes, listener_env(system_dsn, tmp_path, smtp, port), port)
        terminated = sql(
            system_dsn,
            "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            LISTENER,
        )
        assert [row["done"] for row in terminated] == [True]
        wait_until(
            lambda: len(events(processes, process, "listener_connected")) >= 2,
            timeout=10,
            what="listener_connected again",
        )
        insert_mail(system_dsn, 2)
        wait_until(
            lambda: delivered(smtp, 2), timeout=DELIVERY_TIMEOUT_SECONDS, what="mail 2 delivered"
        )
        assert len(events(processes, process, "listener_lost")) == 1
