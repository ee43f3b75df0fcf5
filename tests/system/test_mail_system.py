"""The real ``nproxyd`` process delivering mail: one-shot ticks, several processes, kill -9.

docs/design.md §3 invariant 3 and §4 (``once mail-sender``, ``mail dead``, ``mail retry``), against
a real PostgreSQL and a real SMTP server (aiosmtpd) on 127.0.0.1.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.raw_smtp import RawSmtpServer
from tests.fakes.smtp import FakeSmtpServer
from tests.system.proc import (
    Processes,
    free_port,
    json_lines,
    nproxyd_env,
    run_nproxyd,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system


def insert_mail(dsn: str, count: int, *, start: int = 0, due_in_seconds: float = -1.0) -> list[str]:
    """Insert ``count`` rows with only the contract columns; returns their ids in order."""
    rows = sql(
        dsn,
        "INSERT INTO mail_outbox (to_address, subject, body, message_id, next_attempt_at)"
        " SELECT 'user' || i || '@example.test', 'Subject ' || i, 'Body of mail ' || i,"
        " '<mail-' || i || '@nproxy.localhost>', now() + make_interval(secs => $3)"
        " FROM generate_series($1::int, $2::int) AS i ORDER BY i RETURNING id",
        start,
        start + count - 1,
        due_in_seconds,
    )
    return [row["id"] for row in rows]


def message_id(index: int) -> str:
    return f"<mail-{index}@nproxy.localhost>"


def received_ids(server: FakeSmtpServer) -> Counter[str]:
    return Counter(str(message.message["Message-ID"]) for message in server.messages)


def status_counts(dsn: str) -> Counter[str]:
    rows = sql(dsn, "SELECT status, count(*) AS n FROM mail_outbox GROUP BY status")
    return Counter({row["status"]: row["n"] for row in rows})


@pytest.fixture
def smtp() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer() as server:
        yield server


def mail_env(dsn: str, tmp_path: Path, smtp: FakeSmtpServer, **settings: object) -> dict[str, str]:
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "email.transport": "smtp",
            "email.smtp.host": "127.0.0.1",
            "email.smtp.port": smtp.port,
            "email.smtp.timeout_seconds": 5,
            **{key.replace("__", "."): value for key, value in settings.items()},
        },
    )


@pytest.fixture
def env(system_dsn: str, tmp_path: Path, smtp: FakeSmtpServer) -> dict[str, str]:
    return mail_env(system_dsn, tmp_path, smtp)


def once_mail_sender(env: dict[str, str], timeout: float = 20.0) -> dict[str, Any]:
    result = run_nproxyd(["once", "mail-sender"], env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    [report] = json_lines(result.stdout)
    assert report["actor"] == "mail-sender"
    return report


class TestOnce:
    def test_once_delivers_everything_due_and_prints_one_json_report(
        self, system_dsn: str, env: dict[str, str], smtp: FakeSmtpServer
    ) -> None:
        """`once mail-sender` sends every due row and prints one JSON line with sent_count."""
        insert_mail(system_dsn, 20)
        [later] = insert_mail(system_dsn, 1, start=100, due_in_seconds=3600)

        result = run_nproxyd(["once", "mail-sender"], env, timeout=20)

        assert result.returncode == 0, result.stderr[-4000:]
        lines = result.stdout.splitlines()
        assert len(lines) == 1
        [report] = json_lines(result.stdout)
        assert report["actor"] == "mail-sender"
        assert report["sent_count"] == 20
        assert report["dead_count"] == 0
        assert received_ids(smtp) == Counter({message_id(i): 1 for i in range(20)})
        assert status_counts(system_dsn) == Counter(sent=20, pending=1)
        [row] = sql(system_dsn, "SELECT status, attempts FROM mail_outbox WHERE id = $1", later)
        assert (row["status"], row["attempts"]) == ("pending", 0)


class TestSeveralProcesses:
    def test_two_processes_drain_1000_rows_each_exactly_once(
        self,
        system_dsn: str,
        tmp_path: Path,
        smtp: FakeSmtpServer,
        processes: Processes,
    ) -> None:
        """Two concurrent `once mail-sender` send each of 1,000 rows once: no crash, no dupes."""
        insert_mail(system_dsn, 1000)
        smtp.slow_down(0.01)  # long enough a drain that both processes take part
        env = mail_env(system_dsn, tmp_path, smtp, actors__mail_sender__batch_size=50)

        started = [processes.start(["once", "mail-sender"], env) for _ in range(2)]
        results = [processes.finish(process, timeout=25) for process in started]

        reports = []
        for code, stdout, stderr in results:
            assert code == 0, stderr[-4000:]
            [report] = json_lines(stdout)
            reports.append(report)
        assert sum(report["sent_count"] for report in reports) == 1000
        assert all(report["sent_count"] > 0 for report in reports)
        assert received_ids(smtp) == Counter({message_id(i): 1 for i in range(1000)})
        rows = sql(
            system_dsn, "SELECT status, attempts, count(*) AS n FROM mail_outbox GROUP BY 1, 2"
        )
        assert {(row["status"], row["attempts"]): row["n"] for row in rows} == {("sent", 1): 1000}


class TestKill:
    def test_rows_of_a_killed_sender_are_delivered_after_the_lease(
        self,
        system_dsn: str,
        tmp_path: Path,
        smtp: FakeSmtpServer,
        processes: Processes,
    ) -> None:
        """After kill -9 mid-batch every row is sent; only rows in flight may arrive twice."""
        total = 300
        insert_mail(system_dsn, total)
        smtp.slow_down(0.05)
        env = mail_env(
            system_dsn,
            tmp_path,
            smtp,
            actors__mail_sender__lease_seconds=1,
            actors__mail_sender__batch_size=40,
            email__smtp__max_connections=4,
        )
        victim = processes.start(["once", "mail-sender"], env)

        def mid_batch() -> bool:
            assert victim.poll() is None, processes.output(victim)[1][-4000:]
            leased = sql(
                system_dsn,
                "SELECT count(*) AS n FROM mail_outbox"
                " WHERE status = 'pending' AND leased_by <> ''",
            )[0]["n"]
            return leased > 0 and len(smtp.messages) >= 50

        wait_until(mid_batch, timeout=15, what="a batch in flight after 50 messages")
        processes.kill(victim, signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL

        in_flight = {
            row["message_id"]
            for row in sql(
                system_dsn,
                "SELECT message_id FROM mail_outbox WHERE status = 'pending' AND leased_by <> ''",
            )
        }
        assert in_flight
        assert status_counts(system_dsn)["sent"] < total
        smtp.slow_down(0)
        wait_until(
            lambda: not sql(system_dsn, "SELECT 1 FROM mail_outbox WHERE lease_until > now()"),
            timeout=10,
            what="the killed sender's leases to elapse",
        )

        report = once_mail_sender(env)

        assert report["sent_count"] > 0
        assert status_counts(system_dsn) == Counter(sent=total)
        received = received_ids(smtp)
        assert set(received) == {message_id(i) for i in range(total)}
        duplicates = {mid for mid, count in received.items() if count > 1}
        assert duplicates <= in_flight


class TestDeadMail:
    @pytest.fixture
    def dead_ids(self, system_dsn: str) -> list[str]:
        """Three dead rows (newest last), one pending and one sent row."""
        rows = sql(
            system_dsn,
            "INSERT INTO mail_outbox (status, to_address, subject, body, message_id, attempts,"
            " last_error, updated_at)"
            " SELECT 'dead', 'dead' || i || '@example.test', 'Dead subject ' || i, 'Body',"
            " '<dead-' || i || '@nproxy.localhost>', 8, 'SMTP 550 from x: no such user ' || i,"
            " now() - make_interval(mins => 10 - i)"
            " FROM generate_series(1, 3) AS i ORDER BY i RETURNING id",
        )
        sql(
            system_dsn,
            "INSERT INTO mail_outbox (status, to_address, subject, body, message_id, attempts,"
            " sent_at) VALUES ('sent', 'done@example.test', 'Sent', 'Body',"
            " '<sent-1@nproxy.localhost>', 1, now())",
        )
        insert_mail(system_dsn, 1, due_in_seconds=3600)
        return [row["id"] for row in rows]

    def test_mail_dead_lists_dead_rows(
        self, system_dsn: str, env: dict[str, str], dead_ids: list[str]
    ) -> None:
        """`mail dead` prints one JSON line per dead row: id, to, subject, attempts, error."""
        result = run_nproxyd(["mail", "dead"], env, timeout=20)

        assert result.returncode == 0, result.stderr[-4000:]
        listed = json_lines(result.stdout)
        assert [row["id"] for row in listed] == dead_ids[::-1]
        for row in listed:
            index = dead_ids.index(row["id"]) + 1
            assert row["to_address"] == f"dead{index}@example.test"
            assert row["subject"] == f"Dead subject {index}"
            assert row["attempts"] == 8
            assert row["last_error"] == f"SMTP 550 from x: no such user {index}"

        limited = run_nproxyd(["mail", "dead", "--limit", "2"], env, timeout=20)
        assert limited.returncode == 0, limited.stderr[-4000:]
        assert [row["id"] for row in json_lines(limited.stdout)] == dead_ids[:0:-1]

    def test_mail_retry_ids_puts_only_those_back_to_pending(
        self, system_dsn: str, env: dict[str, str], dead_ids: list[str]
    ) -> None:
        """`mail retry ID` makes that dead row pending with attempts 0, due now; others stay."""
        result = run_nproxyd(["mail", "retry", dead_ids[0]], env, timeout=20)

        assert result.returncode == 0, result.stderr[-4000:]
        assert json_lines(result.stdout) == [{"retried": [dead_ids[0]]}]
        rows = sql(
            system_dsn,
            "SELECT id, status, attempts, next_attempt_at <= now() AS due, leased_by"
            " FROM mail_outbox WHERE id = ANY($1)",
            dead_ids,
        )
        state = {row["id"]: (row["status"], row["attempts"]) for row in rows}
        assert state == {
            dead_ids[0]: ("pending", 0),
            dead_ids[1]: ("dead", 8),
            dead_ids[2]: ("dead", 8),
        }
        assert next(row for row in rows if row["id"] == dead_ids[0])["due"]

    def test_mail_retry_all_dead_then_once_delivers_them(
        self,
        system_dsn: str,
        env: dict[str, str],
        dead_ids: list[str],
        smtp: FakeSmtpServer,
    ) -> None:
        """`mail retry --all-dead` revives every dead row (attempts 0); the next tick sends it."""
        result = run_nproxyd(["mail", "retry", "--all-dead"], env, timeout=20)

        assert result.returncode == 0, result.stderr[-4000:]
        [output] = json_lines(result.stdout)
        assert sorted(output["retried"]) == sorted(dead_ids)
        rows = sql(
            system_dsn, "SELECT status, attempts FROM mail_outbox WHERE id = ANY($1)", dead_ids
        )
        assert [(row["status"], row["attempts"]) for row in rows] == [("pending", 0)] * 3
        assert status_counts(system_dsn) == Counter(pending=4, sent=1)
        empty = run_nproxyd(["mail", "dead"], env, timeout=20)
        assert (empty.returncode, empty.stdout) == (0, "")

        report = once_mail_sender(env)

        assert report["sent_count"] == 3
        assert received_ids(smtp) == Counter({f"<dead-{i}@nproxy.localhost>": 1 for i in (1, 2, 3)})

    @pytest.mark.parametrize(
        "args", [["mail", "retry"], ["mail", "retry", "--all-dead", "some-id"]]
    )
    def test_mail_retry_needs_ids_or_all_dead(
        self, system_dsn: str, env: dict[str, str], dead_ids: list[str], args: list[str]
    ) -> None:
        """`mail retry` with neither ids nor --all-dead (or both) exits 64 and changes nothing."""
        result = run_nproxyd(args, env, timeout=20)

        assert result.returncode == 64
        assert "--all-dead" in result.stderr
        assert status_counts(system_dsn) == Counter(dead=3, pending=1, sent=1)


class TestPoison:
    def test_latin1_refusal_kills_only_its_mail_in_the_running_daemon(
        self, system_dsn: str, tmp_path: Path, processes: Processes
    ) -> None:
        """`nproxyd run`: a Latin-1 554 kills its mail only; the others go out once; it runs on."""
        ids = insert_mail(system_dsn, 5)
        port = free_port()
        with RawSmtpServer() as server:
            server.answer_rcpt("user2@example.test", b"554 5.7.1 Zur\xfcckgewiesen")
            env = nproxyd_env(
                dsn=system_dsn,
                state_dir=tmp_path / "state",
                settings={
                    "http.listen": f"127.0.0.1:{port}",
                    "email.transport": "smtp",
                    "email.smtp.host": server.host,
                    "email.smtp.port": server.port,
                    "actors.mail_sender.interval_seconds": 0.5,
                    "actors.mail_sender.lease_seconds": 2,
                },
            )
            daemon = processes.start(["run"], env)
            wait_ready(processes, daemon, f"http://127.0.0.1:{port}")
            wait_until(
                lambda: status_counts(system_dsn) == Counter(sent=4, dead=1),
                timeout=20,
                what="four mails sent and one dead",
            )
            # More ticks go by, past the lease: a later mail is sent and nothing is sent again.
            insert_mail(system_dsn, 1, start=5)
            wait_until(
                lambda: status_counts(system_dsn) == Counter(sent=5, dead=1),
                timeout=20,
                what="the later mail sent",
            )
            delivered = server.message_ids()

        assert delivered == Counter({message_id(i): 1 for i in (0, 1, 3, 4, 5)})
        [dead] = sql(system_dsn, "SELECT status, last_error FROM mail_outbox WHERE id = $1", ids[2])
        assert "554" in dead["last_error"]
        assert "Zur\ufffdckgewiesen" in dead["last_error"]
        assert daemon.poll() is None
        logged = json_lines(processes.output(daemon)[0])
        assert any(
            line["event"] == "mail_dead" and line.get("mail_id") == ids[2] for line in logged
        )
