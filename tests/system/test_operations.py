"""Operating the real ``nproxyd`` process: configuration checks, exit codes, signals, the
embedded server's ownership file, ``once --dry-run`` and ``status`` (docs/operations.md)."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests import seed
from tests.fakes.nowpayments import FakeNowPayments
from tests.fakes.smtp import FakeSmtpServer
from tests.system.proc import (
    NPROXYD,
    Processes,
    ThrowawayPostgres,
    free_port,
    http_status,
    json_lines,
    nproxyd_env,
    run_nproxyd,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system

NOW_ARG = "2026-03-09T12:00:00Z"
NOW = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)


@pytest.fixture
def postgres() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL server of the test's own, that the test may stop."""
    server = ThrowawayPostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (no traceback, nothing on stdout)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def run(args: list[str], tmp_path: Path, dsn: str = "", /, **settings: object) -> Any:
    env = nproxyd_env(
        dsn=dsn or "postgresql://u:pw@127.0.0.1:1/x", state_dir=tmp_path, settings=settings
    )
    return run_nproxyd(args, env, timeout=60)


def snapshot(dsn: str) -> dict[str, list[str]]:
    """Every row of every table, as text: equal snapshots mean nothing was written."""
    tables = [
        row[0] for row in sql(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    ]
    return {
        table: [row[0] for row in sql(dsn, f'SELECT t::text FROM "{table}" t ORDER BY 1')]
        for table in sorted(tables)
    }


def seed_rows(dsn: str) -> None:
    """A due subscription, a due pending invoice, a due pending mail, a cooled-down key."""
    import asyncio  # noqa: PLC0415

    import asyncpg  # noqa: PLC0415

    async def insert() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await seed.plan(connection)
            await seed.subscription(
                connection,
                "sub_due",
                period_start=NOW - timedelta(days=28),
                period_end=NOW + timedelta(days=1),
            )
            await seed.invoice(
                connection, "inv_due", user_id="user_sub_due", expires_at=NOW - timedelta(hours=1)
            )
            await seed.key(
                connection, "key_1", status="cooldown", cooldown_until=NOW - timedelta(minutes=1)
            )
            await connection.execute(
                "INSERT INTO mail_outbox (id, to_address, subject, body, next_attempt_at)"
                " VALUES ('mail_due', 'customer@example.com', 'Hello', 'Body', $1)",
                NOW - timedelta(minutes=1),
            )
        finally:
            await connection.close()

    asyncio.run(insert())


class TestCheckConfig:
    @pytest.mark.parametrize(
        ("settings", "key"),
        [
            ({"billing.payment_provider": "nowpayments"}, "payment.nowpayments.api_key"),
            ({"http.listen": "localhost"}, "http.listen"),
            ({"database.dsn": "mysql://billing:sekrit@db/nproxy"}, "database.dsn"),
            ({"database.dsn": "postgresql+asyncpg://billing:sekrit@db/x"}, "database.dsn"),
            ({"database.dsn": "postgresql://billing:sekrit@db/x?sslmode=on"}, "database.dsn"),
            ({"database.dsn": "postgresql://billing:se/krit@db/nproxy"}, "database.dsn"),
            ({"database.dsn": "postgresql://billing:se#krit@db/nproxy"}, "database.dsn"),
            ({"actors.mail_sender.interval_seconds": "inf"}, "actors.mail_sender.interval"),
            ({"actors.mail_sender.interval_seconds": "1e-9"}, "actors.mail_sender.interval"),
            ({"billing.claim_lease_seconds": "1e300"}, "billing.claim_lease_seconds"),
            ({"billing.renewal_lead_time_hours": "1e300"}, "billing.renewal_lead_time_hours"),
            ({"email.from_address": ""}, "email.from_address"),
            ({"email.from_address": "a@b.example\r\nBcc: c@d.example"}, "email.from_address"),
        ],
    )
    def test_check_config_refuses_what_run_refuses(
        self, tmp_path: Path, settings: dict[str, object], key: str
    ) -> None:
        """check-config and run both exit 78 with one line naming the key, never the secret."""
        for command in (["check-config"], ["run"]):
            result = run(command, tmp_path, **settings)
            assert result.returncode == 78, (command, result.stderr[-3000:])
            line = one_line_error(result)
            assert key in line
            assert "sekrit" not in line
            assert "krit" not in result.stderr + result.stdout
            assert result.stdout == ""

    def test_a_non_utf8_config_file_exits_78_naming_it(self, tmp_path: Path) -> None:
        """A config file that is not UTF-8 exits 78 with one line, no traceback."""
        path = tmp_path / "nproxyd.toml"
        path.write_bytes(b'[email]\nfrom_address = "caf\xe9 <billing@nproxy.example>"\n')
        result = run(["-c", str(path), "check-config"], tmp_path)
        assert result.returncode == 78
        assert "--config" in one_line_error(result)

    def test_a_non_utf8_environment_value_exits_78_naming_its_key(self, tmp_path: Path) -> None:
        """An environment value that is not UTF-8 exits 78 with one line naming the key."""
        env = nproxyd_env(dsn="postgresql://u@127.0.0.1:1/x", state_dir=tmp_path)
        env_bytes = {k.encode(): v.encode() for k, v in env.items()}
        env_bytes[b"NPROXYD__EMAIL__FROM_ADDRESS"] = b"caf\xe9 <billing@nproxy.example>"
        result = subprocess.run(
            [*NPROXYD, "check-config"],
            env=env_bytes,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 78
        assert "email.from_address" in one_line_error(result)

    def test_a_non_utf8_secret_file_exits_78_naming_its_key(self, tmp_path: Path) -> None:
        """A secret file that is not UTF-8 exits 78 with one line naming the *_file key."""
        secret = tmp_path / "smtp-password"
        secret.write_bytes(b"pass\xff\xfe\n")
        result = run(["check-config"], tmp_path, **{"email.smtp.password_file": secret})
        assert result.returncode == 78
        assert "email.smtp.password_file" in one_line_error(result)

    def test_check_config_prints_the_resolved_paths(self, tmp_path: Path) -> None:
        """The state directory and the maildir path are printed as resolved, never empty."""
        env = nproxyd_env(dsn="", state_dir=tmp_path / "state")
        result = run_nproxyd(["check-config"], env, timeout=60)
        assert result.returncode == 0, result.stderr
        config = json.loads(result.stdout)
        assert config["daemon"]["state_dir"] == str(tmp_path / "state")
        assert config["email"]["maildir"]["path"] == str(tmp_path / "state" / "maildir")


class TestExitCodes:
    @pytest.mark.parametrize(
        "args",
        [
            ["once", "invoice-expirer", "--now", "9999-12-31T23:59:59-01:00"],
            ["once", "invoice-expirer", "--now", "9999-12-30T00:00:00Z", "--allow-future"],
            ["mail", "dead", "--limit", "99999999999999999999"],
            ["mail", "retry", "x" * 300],
        ],
    )
    def test_out_of_range_command_line_exits_64_without_a_traceback(
        self, tmp_path: Path, args: list[str]
    ) -> None:
        """Absurd times and limits on the command line are usage errors (64), one line."""
        result = run(args, tmp_path)
        assert result.returncode == 64, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert result.stdout == ""

    def test_unknown_role_or_database_exits_78_naming_database_dsn(
        self, tmp_path: Path, system_dsn: str
    ) -> None:
        """A role or database the server does not know is a configuration error (78)."""
        user = system_dsn.split("://", 1)[1].split(":", 1)[0].split("@", 1)[0]
        name = system_dsn.split("?", 1)[0].rsplit("/", 1)[1]
        for dsn in (
            system_dsn.replace(f"://{user}", "://no_such_role", 1),
            system_dsn.replace(f"/{name}", "/no_such_database", 1),
        ):
            for command in (["once", "invoice-expirer"], ["run"]):
                result = run(command, tmp_path, dsn)
                assert result.returncode == 78, (dsn, command, result.stderr[-3000:])
                assert "database.dsn" in one_line_error(result)

    def test_a_wrong_password_exits_78_naming_database_dsn_without_it(
        self, postgres: ThrowawayPostgres, tmp_path: Path
    ) -> None:
        """A password the server refuses is a credentials error (78), not 'gave up' (70)."""
        sql(postgres.dsn, "ALTER ROLE postgres PASSWORD 'right-password'")
        hba = postgres.pgdata / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        postgres._commands().pg_ctl(
            ["reload"], pgdata=postgres.pgdata, user=postgres.user, timeout=30
        )
        dsn = postgres.dsn.replace("postgres@", "postgres:wrong-sekrit@", 1)
        for command in (["once", "invoice-expirer"], ["run"], ["migrate"]):
            result = run(command, tmp_path, dsn)
            assert result.returncode == 78, (command, result.stderr[-3000:])
            line = one_line_error(result)
            assert "database.dsn" in line
            assert "sekrit" not in result.stderr + result.stdout

    def test_postgres_stopping_mid_tick_exits_69_with_one_line(
        self, processes: Processes, postgres: ThrowawayPostgres, tmp_path: Path
    ) -> None:
        """`once renewal-scheduler` whose database stops during the tick exits 69, one line."""
        env = nproxyd_env(
            dsn=postgres.dsn,
            state_dir=tmp_path,
            settings={"payment.simulated.latency_ms": 4000, "email.transport": "maildir"},
        )
        assert run_nproxyd(["migrate"], env, timeout=60).returncode == 0
        seed_rows(postgres.dsn)
        process = processes.start(["once", "renewal-scheduler", "--now", NOW_ARG], env)
        wait_until(
            lambda: bool(sql(postgres.dsn, "SELECT 1 FROM nproxyd_renewal_claims")),
            timeout=30,
            what="the renewal claim (the provider call is under way)",
        )
        postgres.stop()
        code, stdout, stderr = processes.finish(process, timeout=60)
        assert code == 69, stderr[-3000:]
        # The last line is nproxyd's one-line error; no traceback of nproxyd's own frames (the
        # driver's pool may log its reconnection attempts before it).
        assert stderr.strip().splitlines()[-1].startswith("nproxyd: database unavailable")
        assert "nproxyd/cli.py" not in stderr
        assert stdout == ""

    def test_version_is_the_package_version(self, tmp_path: Path) -> None:
        """`nproxyd --version` prints the installed package's version."""
        result = run(["--version"], tmp_path)
        assert result.returncode == 0
        assert result.stdout.strip() == f"nproxyd {version('nproxyd')}"


def daemon_env(dsn: str, tmp_path: Path, port: int, **settings: object) -> dict[str, str]:
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "http.listen": f"127.0.0.1:{port}",
            "email.transport": "maildir",
            "email.maildir.path": tmp_path / "maildir",
            "daemon.shutdown_grace_seconds": 5,
            **settings,
        },
    )


def signal_logged(processes: Processes, process: subprocess.Popen[bytes], name: str) -> bool:
    """Whether ``process`` logged that it received signal ``name``."""
    return any(
        line.get("event") == "signal_received" and line.get("signal") == name
        for line in events(processes, process)
    )


def events(processes: Processes, process: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    return json_lines(processes.output(process)[0])


class TestSignals:
    def test_sighup_and_sigusr_are_logged_and_the_daemon_keeps_running(
        self, processes: Processes, system_dsn: str, tmp_path: Path
    ) -> None:
        """SIGHUP/SIGUSR1/SIGUSR2 are logged and survived; SIGTERM still stops cleanly."""
        port = free_port()
        process = processes.start(["run"], daemon_env(system_dsn, tmp_path, port))
        base = f"http://127.0.0.1:{port}"
        wait_ready(processes, process, base, timeout=30)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            process.send_signal(sig)
            wait_until(
                functools.partial(signal_logged, processes, process, sig.name),
                timeout=10,
                what=f"signal_received for {sig.name}",
            )
        assert process.poll() is None
        assert http_status(base + "/readyz") == 200
        process.send_signal(signal.SIGTERM)
        code, _, stderr = processes.finish(process, timeout=20)
        assert code == 0, stderr[-3000:]
        assert events(processes, process)[-1]["event"] == "daemon_stopped"


class TestEmbeddedPostgres:
    def test_a_killed_process_does_not_keep_the_embedded_server_running_forever(
        self, processes: Processes, tmp_path: Path
    ) -> None:
        """After `kill -9` of the daemon, the next clean exit stops the embedded server again."""
        port = free_port()
        state = tmp_path / "state"
        env = daemon_env("", tmp_path, port)
        daemon = processes.start(["run"], env)
        wait_ready(processes, daemon, f"http://127.0.0.1:{port}", timeout=90)
        processes.kill(daemon)
        daemon.wait(timeout=10)
        postmaster = state / "postgres" / "postmaster.pid"
        assert postmaster.exists()  # the server outlives the killed daemon

        result = run_nproxyd(["once", "invoice-expirer"], env, timeout=90)

        assert result.returncode == 0, result.stderr[-3000:]
        wait_until(lambda: not postmaster.exists(), timeout=30, what="the server to stop")
        assert json.loads((state / "postgres" / ".handle_pids.json").read_text()) == []


@pytest.fixture
def outside_world() -> Iterator[tuple[FakeNowPayments, FakeSmtpServer]]:
    """A NOWPayments stand-in and a real SMTP server, both counting what reaches them."""
    with FakeNowPayments().running_in_thread() as provider, FakeSmtpServer() as smtp:
        yield provider, smtp


def world_env(
    dsn: str, tmp_path: Path, world: tuple[FakeNowPayments, FakeSmtpServer]
) -> dict[str, str]:
    provider, smtp = world
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "billing.payment_provider": "nowpayments",
            "payment.nowpayments.api_base_url": provider.url,
            "payment.nowpayments.api_key": provider.api_key,
            "email.transport": "smtp",
            "email.smtp.host": "127.0.0.1",
            "email.smtp.port": smtp.port,
        },
    )


class TestOnceDryRun:
    @pytest.mark.parametrize(
        ("actor", "expected"),
        [
            ("renewal-scheduler", {"created_count": 1, "provider_calls_skipped": 1}),
            ("mail-sender", {"sent_count": 1, "mail_not_sent": 1}),
            ("invoice-expirer", {"expired_count": 1}),
            ("key-pool-recoverer", {"recovered_count": 1}),
            ("payment-watcher", {"checked": 1, "provider_calls_skipped": 1}),
        ],
    )
    def test_dry_run_reports_the_tick_and_changes_nothing(
        self,
        system_dsn: str,
        tmp_path: Path,
        outside_world: tuple[FakeNowPayments, FakeSmtpServer],
        actor: str,
        expected: dict[str, int],
    ) -> None:
        """`once ACTOR --dry-run` reports the tick; it writes, calls and sends nothing."""
        seed_rows(system_dsn)
        before = snapshot(system_dsn)
        env = world_env(system_dsn, tmp_path, outside_world)

        result = run_nproxyd(["once", actor, "--now", NOW_ARG, "--dry-run"], env, timeout=60)

        assert result.returncode == 0, result.stderr[-3000:]
        [report] = json_lines(result.stdout)
        assert report["actor"] == actor
        assert report["dry_run"] is True
        assert {key: report[key] for key in expected} == expected
        assert snapshot(system_dsn) == before
        provider, smtp = outside_world
        assert provider.requests == []
        assert smtp.connections == 0
        assert smtp.messages == []

    def test_the_same_tick_without_dry_run_does_write(
        self,
        system_dsn: str,
        tmp_path: Path,
        outside_world: tuple[FakeNowPayments, FakeSmtpServer],
    ) -> None:
        """The same tick without --dry-run calls the provider and writes (a control)."""
        seed_rows(system_dsn)
        before = snapshot(system_dsn)
        env = world_env(system_dsn, tmp_path, outside_world)

        result = run_nproxyd(["once", "renewal-scheduler", "--now", NOW_ARG], env, timeout=60)

        assert result.returncode == 0, result.stderr[-3000:]
        assert json_lines(result.stdout)[0]["created_count"] == 1
        assert "dry_run" not in json_lines(result.stdout)[0]
        assert len(outside_world[0].requests) == 1
        assert snapshot(system_dsn) != before

    def test_now_in_the_future_is_refused_unless_allowed(
        self, system_dsn: str, tmp_path: Path
    ) -> None:
        """--now more than 5 minutes ahead exits 64 and writes nothing; --allow-future runs."""
        seed_rows(system_dsn)
        before = snapshot(system_dsn)
        env = nproxyd_env(dsn=system_dsn, state_dir=tmp_path / "state")
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()

        refused = run_nproxyd(["once", "invoice-expirer", "--now", tomorrow], env, timeout=60)
        allowed = run_nproxyd(
            ["once", "invoice-expirer", "--now", tomorrow, "--allow-future", "--dry-run"],
            env,
            timeout=60,
        )

        assert refused.returncode == 64
        assert "--allow-future" in one_line_error(refused)
        assert refused.stdout == ""
        assert snapshot(system_dsn) == before
        assert allowed.returncode == 0, allowed.stderr[-3000:]
        assert json_lines(allowed.stdout)[0]["expired_count"] == 1

    def test_once_help_says_that_it_writes(self, tmp_path: Path) -> None:
        """`once --help` warns that a tick writes and names --dry-run and --allow-future."""
        result = run(["once", "--help"], tmp_path)
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert "WRITES" in text
        assert "--dry-run" in text
        assert "--allow-future" in text


class TestStatusCommand:
    def test_status_reads_base_or_full_url_and_exits_by_readiness(
        self, processes: Processes, postgres: ThrowawayPostgres, tmp_path: Path
    ) -> None:
        """`status` takes either URL, prints a table or --json, exits 0 ready / 1 not ready."""
        port = free_port()
        env = daemon_env(postgres.dsn, tmp_path, port, **{"daemon.instance_id": "ops-test-1"})
        daemon = processes.start(["run"], env)
        base = f"http://127.0.0.1:{port}"
        wait_ready(processes, daemon, base, timeout=30)
        cli = nproxyd_env(dsn="", state_dir=tmp_path / "cli")

        table = run_nproxyd(["status", "--url", base + "/status"], cli, timeout=30)
        as_json = run_nproxyd(["status", "--url", base + "/", "--json"], cli, timeout=30)

        assert table.returncode == 0, table.stderr
        assert "ops-test-1" in table.stdout
        assert "None" not in table.stdout
        assert "{" not in table.stdout
        assert "'" not in table.stdout
        rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line}
        assert rows["invoice-expirer"][1:3] == ["yes", "ok"]
        assert as_json.returncode == 0, as_json.stderr
        [document] = json_lines(as_json.stdout)
        assert document["ready"] is True
        assert document["instance"] == "ops-test-1"

        postgres.stop()
        wait_until(lambda: http_status(base + "/readyz") == 503, timeout=30, what="503")
        not_ready = run_nproxyd(["status", "--url", base], cli, timeout=30)

        assert not_ready.returncode == 1, not_ready.stderr
        assert "ops-test-1" in not_ready.stdout

    def test_status_of_something_that_is_not_nproxyd_exits_69(self, tmp_path: Path) -> None:
        """A URL that answers without nproxyd's /status JSON is 'unreachable' (69), one line."""
        with FakeSmtpServer() as smtp:  # speaks SMTP, not HTTP
            result = run(["status", "--url", f"http://127.0.0.1:{smtp.port}"], tmp_path)
        assert result.returncode == 69
        one_line_error(result)
