"""Crashes and outages under the real daemon (docs/design.md §6 reliability).

Two `nproxyd run` instances share one database; the payment provider fails 30 % of its calls,
the SMTP server refuses a run of messages and goes down for a while, and instances are killed
with SIGKILL at random moments and restarted. Once quiet: exactly one automatic invoice per due
subscription, each with exactly one mail, every mail sent or dead with its reason, /readyz 200
and both daemons still running.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.smtp import FakeSmtpServer
from tests.system.proc import (
    Processes,
    free_port,
    http_status,
    nproxyd_env,
    quiet,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system

DUE = 60


@pytest.fixture
def smtp() -> Iterator[FakeSmtpServer]:
    server = FakeSmtpServer().start()
    yield server
    server.stop()


def seed_due_subscriptions(dsn: str, count: int) -> None:
    """`count` active manual-renewal subscriptions ending within the 72 h window."""
    sql(
        dsn,
        "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
        " monthly_price_usd, billing_currency) VALUES ('plan', 'm', 'M', 100, 29, 'USDT')",
    )
    sql(
        dsn,
        "INSERT INTO users (id, email) SELECT 'u' || g, 'u' || g || '@example.com'"
        " FROM generate_series(1, $1::int) AS g",
        count,
    )
    sql(
        dsn,
        "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
        " current_period_start, current_period_end)"
        " SELECT 's' || g, 'u' || g, 'plan', 'active', true, now() - interval '29 days',"
        " now() + interval '1 day' FROM generate_series(1, $1::int) AS g",
        count,
    )


def daemon_env(
    dsn: str, tmp_path: Path, smtp: FakeSmtpServer, name: str, port: int
) -> dict[str, str]:
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / name,
        settings={
            "daemon.instance_id": name,
            "http.listen": f"127.0.0.1:{port}",
            "billing.claim_lease_seconds": 1,
            "billing.retry_base_seconds": 0.2,
            "billing.retry_max_seconds": 1,
            "billing.provider_concurrency": 4,
            "payment.simulated.latency_ms": 40,
            "payment.simulated.failure_rate": 0.3,
            "actors.renewal_scheduler.interval_seconds": 0.5,
            "actors.renewal_scheduler.batch_size": 10,
            "actors.mail_sender.interval_seconds": 0.5,
            "actors.mail_sender.lease_seconds": 1,
            "actors.mail_sender.retry_base_seconds": 0.2,
            "actors.mail_sender.retry_max_seconds": 1,
            "actors.mail_sender.max_attempts": 50,
            "email.transport": "smtp",
            "email.smtp.host": smtp.host,
            "email.smtp.port": smtp.port,
            "email.smtp.timeout_seconds": 2,
            "email.smtp.max_connections": 2,
        },
    )


class TestChaos:
    def test_kill9_flaky_provider_flaky_smtp_two_instances(
        self, system_dsn: str, tmp_path: Path, smtp: FakeSmtpServer
    ) -> None:
        """After random SIGKILLs and outages, every invariant holds and the daemons recover."""
        dsn = system_dsn
        seed_due_subscriptions(dsn, DUE)
        smtp.fail_next(15)
        rng = random.Random(20261124)
        processes = Processes(tmp_path / "logs")
        ports = {name: free_port() for name in ("a", "b")}
        envs = {name: daemon_env(dsn, tmp_path, smtp, name, port) for name, port in ports.items()}
        running: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in ports:
                running[name] = processes.start(["run"], envs[name])
            for round_number in range(6):
                time.sleep(rng.uniform(0.2, 1.2))
                victim = rng.choice(sorted(running))
                processes.kill(running[victim])
                if round_number == 2:
                    smtp.stop()
                    time.sleep(1.5)
                    smtp.start()
                running[victim] = processes.start(["run"], envs[victim])
            wait_until(
                lambda: quiet(dsn, DUE), timeout=60, interval=0.25, what="the work to finish"
            )
            for name, process in running.items():
                wait_ready(processes, process, f"http://127.0.0.1:{ports[name]}", timeout=20)
            alive = {name: process.poll() is None for name, process in running.items()}
            ready = {
                name: http_status(f"http://127.0.0.1:{port}/readyz") for name, port in ports.items()
            }
        finally:
            processes.kill_all()

        assert alive == {"a": True, "b": True}
        assert ready == {"a": 200, "b": 200}
        per_subscription = sql(
            dsn, "SELECT subscription_id, count(*) AS n FROM payment_invoices GROUP BY 1"
        )
        assert len(per_subscription) == DUE
        assert {row["n"] for row in per_subscription} == {1}
        mails = sql(
            dsn,
            "SELECT i.id, count(m.id) AS n FROM payment_invoices i LEFT JOIN mail_outbox m"
            " ON m.dedupe_key = 'renewal-invoice:' || i.id GROUP BY i.id",
        )
        assert {row["n"] for row in mails} == {1}
        outcomes = sql(dsn, "SELECT status, last_error FROM mail_outbox")
        assert len(outcomes) == DUE
        assert all(row["status"] in ("sent", "dead") for row in outcomes)
        assert all(row["last_error"] for row in outcomes if row["status"] == "dead")
        delivered = {message.headers["Message-ID"] for message in smtp.messages}
        sent_ids = {
            row["message_id"]
            for row in sql(dsn, "SELECT message_id FROM mail_outbox WHERE status = 'sent'")
        }
        assert sent_ids <= delivered
