"""The payment watcher through the real ``nproxyd`` process: once, the CLI, and run with IPN.

nproxyd records what the provider reports and shows it; it never sets an invoice paid and
never changes a subscription (docs/design.md, invariant 9).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.nowpayments import (
    FakeNowPayments,
    ipn_body,
    ipn_signature,
    send_ipn,
    status_answer,
)
from tests.system.proc import (
    Processes,
    free_port,
    http_get,
    nproxyd_env,
    run_nproxyd,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system

SECRET = "system-ipn-secret"
OPERATOR = "operator@example.com"


def seed_invoices(dsn: str, provider: str, ids: list[str]) -> None:
    sql(dsn, "INSERT INTO users (id, email) VALUES ('u1', 'buyer@example.com')")
    sql(
        dsn,
        "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
        " monthly_price_usd, billing_currency) VALUES ('p1', 'pro', 'Pro', 100, 29, 'USDT')",
    )
    sql(
        dsn,
        "INSERT INTO subscriptions (id, user_id, plan_id, status, current_period_end)"
        " VALUES ('s1', 'u1', 'p1', 'pending_activation', now() + interval '30 days')",
    )
    for invoice_id in ids:
        sql(
            dsn,
            "INSERT INTO payment_invoices (id, user_id, subscription_id, provider,"
            " provider_invoice_id, status, currency, amount_crypto, amount_usd)"
            " VALUES ($1, 'u1', 's1', $2, $1, 'pending', 'USDT', 29, 29)",
            invoice_id,
            provider,
        )


def shared_rows(dsn: str) -> list[Any]:
    invoices = sql(dsn, "SELECT * FROM payment_invoices ORDER BY id")
    subscriptions = sql(dsn, "SELECT * FROM subscriptions ORDER BY id")
    return [dict(row) for row in [*invoices, *subscriptions]]


def provider_statuses(dsn: str) -> dict[str, str | None]:
    rows = sql(dsn, "SELECT invoice_id, provider_status FROM nproxyd_invoice_payments")
    return {row["invoice_id"]: row["provider_status"] for row in rows}


def sources(dsn: str, invoice_id: str) -> list[tuple[str | None, str, str]]:
    rows = sql(
        dsn,
        "SELECT from_status, to_status, source FROM nproxyd_invoice_payment_history"
        " WHERE invoice_id = $1 ORDER BY at, id",
        invoice_id,
    )
    return [(row["from_status"], row["to_status"], row["source"]) for row in rows]


class TestOnceAndCli:
    def test_once_records_the_simulated_story_and_the_cli_shows_it(
        self, system_dsn: str, tmp_path: Path
    ) -> None:
        """`once payment-watcher` on the simulated provider; `payments awaiting`/`show` list it."""
        seed_invoices(system_dsn, "simulated", ["inv-a", "inv-b"])
        before = shared_rows(system_dsn)
        env = nproxyd_env(
            dsn=system_dsn,
            state_dir=tmp_path / "state",
            settings={"payment.simulated.paid_after_seconds": 0},
        )
        later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()

        once = run_nproxyd(["once", "payment-watcher", "--now", later], env)
        awaiting = run_nproxyd(["payments", "awaiting", "--json"], env)
        table = run_nproxyd(["payments", "awaiting"], env)
        show = run_nproxyd(["payments", "show", "inv-a"], env)
        missing = run_nproxyd(["payments", "show", "no-such-invoice"], env)

        assert once.returncode == 0, once.stderr
        report = json.loads(once.stdout)
        assert report["actor"] == "payment-watcher"
        assert (report["checked"], report["status_changes"]) == (2, {"finished": 2})
        assert report["awaiting_count"] == 2
        listed = [json.loads(line) for line in awaiting.stdout.splitlines()]
        assert sorted(row["invoice_id"] for row in listed) == ["inv-a", "inv-b"]
        assert {row["user_email"] for row in listed} == {"buyer@example.com"}
        assert {row["plan_code"] for row in listed} == {"pro"}
        assert {row["partial"] for row in listed} == {False}
        assert table.returncode == 0 and "inv-a" in table.stdout and "finished" in table.stdout
        assert show.returncode == 0, show.stderr
        assert "finished" in show.stdout and "poll" in show.stdout
        assert missing.returncode == 64
        assert shared_rows(system_dsn) == before

    def test_partially_paid_invoices_are_marked_partial(
        self, system_dsn: str, tmp_path: Path
    ) -> None:
        """With partial_fraction = 1 every simulated invoice ends partially paid, half paid."""
        seed_invoices(system_dsn, "simulated", ["inv-p"])
        env = nproxyd_env(
            dsn=system_dsn,
            state_dir=tmp_path / "state",
            settings={
                "payment.simulated.paid_after_seconds": 0,
                "payment.simulated.partial_fraction": 1,
            },
        )
        assert run_nproxyd(["once", "payment-watcher"], env).returncode == 0

        awaiting = run_nproxyd(["payments", "awaiting", "--json"], env)
        table = run_nproxyd(["payments", "awaiting"], env)

        (row,) = [json.loads(line) for line in awaiting.stdout.splitlines()]
        assert row["provider_status"] == "partially_paid" and row["partial"] is True
        assert Decimal(row["actually_paid"]) == Decimal("14.5")
        assert "PARTIAL" in table.stdout


class TestRunWithIpn:
    def test_ipn_poll_forgery_and_partial_payment_all_end_right(
        self, system_dsn: str, tmp_path: Path, processes: Processes
    ) -> None:
        """Paid by IPN, paid by poll only, forged IPN (401) and partial: all end right,
        the operator is mailed once each, and invoices and subscriptions are untouched."""
        now = datetime.now(UTC)
        seed_invoices(system_dsn, "nowpayments", ["7001", "7002", "7003", "7004"])
        before = shared_rows(system_dsn)
        waiting = status_answer("0", "waiting", now - timedelta(minutes=10))
        with FakeNowPayments().running_in_thread() as fake:
            fake.script_status("7001", {**waiting, "payment_id": 7001})
            fake.script_status(
                "7002", {**waiting, "payment_id": 7002}, status_answer("7002", "finished", now)
            )
            fake.script_status("7003", {**waiting, "payment_id": 7003})
            fake.script_status(
                "7004", status_answer("7004", "partially_paid", now, actually_paid=10)
            )
            port, ipn_port = free_port(), free_port()
            env = nproxyd_env(
                dsn=system_dsn,
                state_dir=tmp_path / "state",
                settings={
                    "http.listen": f"127.0.0.1:{port}",
                    "ipn.listen": f"127.0.0.1:{ipn_port}",
                    "billing.payment_provider": "nowpayments",
                    "billing.operator_email": OPERATOR,
                    "payment.nowpayments.api_base_url": fake.url,
                    "payment.nowpayments.api_key": fake.api_key,
                    "payment.nowpayments.ipn_secret": SECRET,
                    "actors.payment_watcher.interval_seconds": 0.5,
                    "actors.payment_watcher.min_check_seconds": 1,
                    "actors.payment_watcher.max_check_seconds": 2,
                    "email.maildir.path": str(tmp_path / "maildir"),
                },
            )
            process = processes.start(["run"], env)
            base = f"http://127.0.0.1:{port}"
            wait_ready(processes, process, base, timeout=20)
            ipn_url = f"http://127.0.0.1:{ipn_port}/ipn/nowpayments"

            paid = ipn_body(status_answer("7001", "finished", now))
            forged = ipn_body(status_answer("7003", "finished", now))
            assert send_ipn(ipn_url, paid, SECRET) == 200
            assert send_ipn(ipn_url, forged, SECRET, signature=ipn_signature(forged, "x")) == 401

            expected = {"7001": "finished", "7002": "finished", "7004": "partially_paid"}
            wait_until(
                lambda: {k: provider_statuses(system_dsn).get(k) for k in expected} == expected,
                timeout=30,
                what="every payment to reach its final state",
            )
            wait_until(
                lambda: (
                    sql(system_dsn, "SELECT count(*) FROM mail_outbox WHERE status = 'sent'")[0][0]
                    == 3
                ),
                timeout=30,
                what="three operator mails to be delivered",
            )
            _, metrics = http_get(base + "/metrics")
            _, status_text = http_get(base + "/status")

        assert provider_statuses(system_dsn)["7003"] == "waiting"
        assert ("waiting", "finished", "ipn") in sources(system_dsn, "7001")
        assert sources(system_dsn, "7002")[-1] == ("waiting", "finished", "poll")
        assert all(source == "poll" for _, _, source in sources(system_dsn, "7003"))
        assert shared_rows(system_dsn) == before
        keys = sql(system_dsn, "SELECT dedupe_key, to_address FROM mail_outbox ORDER BY 1")
        assert [(row[0], row[1]) for row in keys] == [
            ("payment-status:7001:finished", OPERATOR),
            ("payment-status:7002:finished", OPERATOR),
            ("payment-status:7004:partially_paid", OPERATOR),
        ]
        assert 'nproxyd_ipn_requests_total{outcome="rejected"} 1.0' in metrics
        assert 'nproxyd_ipn_requests_total{outcome="ok"} 1.0' in metrics
        assert "nproxyd_invoices_awaiting_activation 3.0" in metrics
        assert json.loads(status_text)["payments"]["awaiting_activation"] == 3
        stdout = processes.output(process)[0]
        assert SECRET not in stdout
        assert "ipn_rejected" in stdout
