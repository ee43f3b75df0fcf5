"""Poison through the real ``nproxyd`` process: a bad row and a hostile answer among good ones.

A subscription whose cycle start is ``-infinity`` and a NOWPayments answer with a NUL in the
payment address for one order: ``once renewal-scheduler`` exits 0 and ``run`` keeps running;
every good subscription is invoiced once with one mail; the provider is asked once for the
poison order; the logs name both ids.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nproxyd.core.rules import order_id
from tests.fakes.nowpayments import FakeNowPayments, Mode
from tests.system.proc import (
    Processes,
    free_port,
    http_status,
    nproxyd_env,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system

NOW_ARG = "2026-03-09T12:00:00Z"
AFTER_LONG_LEASE_ARG = "2026-03-09T12:10:00Z"  # after the 120 s lease, within failed_retry_hours
PERIOD_START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PERIOD_END = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
GOOD = [f"good_{number}" for number in range(1, 5)]


@pytest.fixture
def fake() -> Iterator[FakeNowPayments]:
    server = FakeNowPayments()
    with server.running_in_thread():
        yield server


def seed(dsn: str, start: datetime, end: datetime) -> None:
    """Good subscriptions, one whose cycle start is -infinity and one to be answered badly."""
    sql(
        dsn,
        "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
        " monthly_price_usd, billing_currency) VALUES ('plan', 'm', 'M', 100, 29, 'USDT')",
    )
    for sub_id in [*GOOD, "unreadable", "poison"]:
        sql(dsn, "INSERT INTO users (id, email) VALUES ($1, $1 || '@example.com')", sub_id)
        sql(
            dsn,
            "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
            " current_period_start, current_period_end)"
            " VALUES ($1, $1, 'plan', 'active', true, $2, $3)",
            sub_id,
            start,
            end,
        )
    sql(
        dsn,
        "UPDATE subscriptions SET current_period_start = '-infinity' WHERE id = 'unreadable'",
    )


def env(dsn: str, tmp_path: Path, fake: FakeNowPayments, **settings: object) -> dict[str, str]:
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "billing.payment_provider": "nowpayments",
            "payment.nowpayments.api_base_url": fake.url,
            "payment.nowpayments.api_key": fake.api_key,
            "email.transport": "maildir",
            "email.maildir.path": str(tmp_path / "maildir"),
            "urls.app_base_url": "https://app.nproxy.example",
            **settings,
        },
    )


def log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def logged(lines: list[dict[str, Any]], event: str) -> set[str]:
    return {line["subscription_id"] for line in lines if line.get("event") == event}


def invoices_per_subscription(dsn: str) -> dict[str, int]:
    rows = sql(dsn, "SELECT subscription_id, count(*) AS n FROM payment_invoices GROUP BY 1")
    return {row["subscription_id"]: row["n"] for row in rows}


def renewal_mails(dsn: str) -> int:
    rows = sql(
        dsn,
        "SELECT count(*) AS n FROM mail_outbox AS m JOIN payment_invoices AS i"
        " ON m.dedupe_key = 'renewal-invoice:' || i.id",
    )
    count: int = rows[0]["n"]
    return count


def poison_claim(dsn: str) -> dict[str, Any]:
    [row] = sql(
        dsn,
        "SELECT state, last_error, available_at FROM nproxyd_renewal_claims"
        " WHERE subscription_id = 'poison'",
    )
    return dict(row)


def once(processes: Processes, environment: dict[str, str], now: str) -> tuple[dict[str, Any], str]:
    process = processes.start(["once", "renewal-scheduler", "--now", now], environment)
    code, stdout, stderr = processes.finish(process, timeout=25)
    assert code == 0, stderr[-4000:]
    [report] = log_lines(stdout)
    return report, stderr


class TestPoisonThroughOnce:
    def test_once_invoices_the_good_and_quarantines_the_poison(
        self, system_dsn: str, tmp_path: Path, fake: FakeNowPayments, processes: Processes
    ) -> None:
        """`once` exits 0: good ones invoiced once, the bad row skipped, the poison asked once."""
        seed(system_dsn, PERIOD_START, PERIOD_END)
        poison_order = order_id("poison", PERIOD_START)
        fake.set_order_mode(poison_order, Mode.NUL_ADDRESS)
        environment = env(system_dsn, tmp_path, fake)

        report, stderr = once(processes, environment, NOW_ARG)
        again, _ = once(processes, environment, AFTER_LONG_LEASE_ARG)

        assert (report["created_count"], report["skipped_bad"]) == (4, 1)
        assert (report["permanent_failures"], report["transient_failures"]) == (1, 0)
        assert report["skipped_reasons"] == {
            "current_period_start is not a representable timestamp": 1
        }
        assert (again["claimed"], again["created_count"]) == (0, 0)
        assert invoices_per_subscription(system_dsn) == dict.fromkeys(GOOD, 1)
        assert renewal_mails(system_dsn) == 4
        claim = poison_claim(system_dsn)
        assert claim["state"] == "failed"
        assert poison_order in claim["last_error"]
        assert fake.calls_for(poison_order) == 1
        lines = log_lines(stderr)
        assert logged(lines, "renewal_candidate_skipped") == {"unreadable"}
        assert logged(lines, "renewal_invoice_failed") == {"poison"}


class TestPoisonThroughRun:
    def test_daemon_keeps_running_and_invoices_the_good(
        self, system_dsn: str, tmp_path: Path, fake: FakeNowPayments, processes: Processes
    ) -> None:
        """`run` stays up and ready: good ones invoiced and mailed once, the poison asked once."""
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=29)
        seed(system_dsn, start, start + timedelta(days=30))
        poison_order = order_id("poison", start)
        fake.set_order_mode(poison_order, Mode.NUL_ADDRESS)
        port = free_port()
        environment = env(
            system_dsn,
            tmp_path,
            fake,
            **{
                "http.listen": f"127.0.0.1:{port}",
                "billing.claim_lease_seconds": 1,
                "actors.renewal_scheduler.interval_seconds": 0.3,
                "actors.mail_sender.interval_seconds": 0.3,
            },
        )
        daemon = processes.start(["run"], environment)
        try:
            wait_until(
                lambda: self._done(system_dsn), timeout=30, interval=0.2, what="invoices and mail"
            )
            # Several more ticks, each past the 1 s lease: the poison slot is not asked again.
            time.sleep(2.5)
            wait_ready(processes, daemon, f"http://127.0.0.1:{port}")
            ready = http_status(f"http://127.0.0.1:{port}/readyz")
            alive = daemon.poll() is None
        finally:
            processes.kill(daemon, sig=15)
            subprocess_wait(daemon)
        stdout, _ = processes.output(daemon)

        assert (alive, ready) == (True, 200)
        assert invoices_per_subscription(system_dsn) == dict.fromkeys(GOOD, 1)
        assert renewal_mails(system_dsn) == 4
        assert len(list((tmp_path / "maildir" / "new").iterdir())) == 4
        assert poison_claim(system_dsn)["state"] == "failed"
        assert fake.calls_for(poison_order) == 1
        lines = log_lines(stdout)
        assert logged(lines, "renewal_candidate_skipped") == {"unreadable"}
        assert logged(lines, "renewal_invoice_failed") == {"poison"}
        skipped = [line for line in lines if line.get("event") == "renewal_candidate_skipped"]
        assert len(skipped) == 1  # many ticks, one warning within the hour

    @staticmethod
    def _done(dsn: str) -> bool:
        sent = sql(dsn, "SELECT count(*) AS n FROM mail_outbox WHERE status = 'sent'")[0]["n"]
        claims = sql(
            dsn, "SELECT count(*) AS n FROM nproxyd_renewal_claims WHERE state = 'failed'"
        )[0]["n"]
        return bool(sent == 4 and claims == 1)


def subprocess_wait(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        Processes.kill(process)
        process.wait()
