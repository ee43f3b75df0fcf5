"""The real ``nproxyd`` process: readiness, logs, signals, sd_notify, exit codes, PostgreSQL
restarts under the daemon."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from nproxyd.store.migrate import _LOCK_KEY as MIGRATION_LOCK_KEY
from nproxyd.store.migrate import available
from tests import seed
from tests.pg import TestServer, with_database
from tests.system.proc import (
    Processes,
    ThrowawayPostgres,
    free_port,
    http_get,
    http_status,
    json_lines,
    nproxyd_env,
    run_nproxyd,
    sql,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.system

ACTORS = (
    "invoice-expirer",
    "renewal-scheduler",
    "mail-sender",
    "key-pool-recoverer",
    "payment-watcher",
)
INSTANCE = "system-test-1"
GRACE_SECONDS = 5
TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# Migrators poll for the lock (they never block inside a statement), so "waiting" means
# connected to the database while the lock is held by someone else.
WAITING_FOR_LOCK = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name = 'nproxyd'"
)


def database_name(dsn: str) -> str:
    """The database of a URI DSN, also when a socket directory follows in ``?host=``."""
    return dsn.split("?", 1)[0].rsplit("/", 1)[-1]


def drop_database(admin_dsn: str, name: str) -> None:
    sql(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path (an AF_UNIX socket path must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nproxyd-sys-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def daemon_env(dsn: str, tmp_path: Path, port: int, **settings: object) -> dict[str, str]:
    """A daemon on ``port`` with maildir delivery and short actor intervals."""
    return nproxyd_env(
        dsn=dsn,
        state_dir=tmp_path / "state",
        settings={
            "http.listen": f"127.0.0.1:{port}",
            "email.transport": "maildir",
            "email.maildir.path": tmp_path / "maildir",
            "daemon.instance_id": INSTANCE,
            "daemon.shutdown_grace_seconds": GRACE_SECONDS,
            "actors.invoice_expirer.interval_seconds": 1,
            "actors.renewal_scheduler.interval_seconds": 1,
            "actors.mail_sender.interval_seconds": 1,
            "actors.key_pool_recoverer.interval_seconds": 1,
            **settings,
        },
    )


class Daemon:
    """One ``nproxyd run`` process and its base URL."""

    def __init__(self, processes: Processes, env: dict[str, str], port: int) -> None:
        self.processes = processes
        self.base_url = f"http://127.0.0.1:{port}"
        self.process = processes.start(["run"], env)

    def wait_ready(self, timeout: float = 15.0) -> None:
        wait_ready(self.processes, self.process, self.base_url, timeout=timeout)

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.base_url + path)

    def get_json(self, path: str) -> tuple[int, Any]:
        status, body = self.get(path)
        return status, json.loads(body)

    def terminate(self, timeout: float = GRACE_SECONDS + 5) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        return self.processes.finish(self.process, timeout=timeout)

    def log_lines(self) -> list[dict[str, Any]]:
        return json_lines(self.processes.output(self.process)[0])

    def events(self) -> list[str]:
        return [line["event"] for line in self.log_lines()]


@pytest.fixture
def start_daemon(processes: Processes, system_dsn: str, tmp_path: Path) -> Any:
    """Start ``nproxyd run`` on a free port against the test's database."""

    def start(**settings: object) -> Daemon:
        port = free_port()
        return Daemon(processes, daemon_env(system_dsn, tmp_path, port, **settings), port)

    return start


class TestRun:
    def test_run_becomes_ready_and_answers_every_endpoint(self, start_daemon: Any) -> None:
        """`nproxyd run` is ready within seconds and answers /livez, /readyz, /metrics, /status."""
        started = time.monotonic()
        daemon = start_daemon()
        daemon.wait_ready(timeout=15)
        assert time.monotonic() - started < 15

        assert daemon.get_json("/livez") == (200, {"live": True})
        status, ready = daemon.get_json("/readyz")
        assert status == 200
        assert ready["ready"] is True
        assert set(ready["actors"]) == set(ACTORS)
        status, metrics = daemon.get("/metrics")
        assert status == 200
        assert "# TYPE nproxyd_actor_ticks_total counter" in metrics
        assert 'nproxyd_actor_ticks_total{actor="invoice-expirer",outcome="ok"}' in metrics
        status, body = daemon.get_json("/status")
        assert status == 200
        assert body["instance"] == INSTANCE
        assert set(body["actors"]) == set(ACTORS)
        assert daemon.get_json("/nope")[0] == 404
        assert daemon.process.poll() is None

    def test_stdout_is_one_json_object_per_line_with_the_contract_fields(
        self, start_daemon: Any, system_dsn: str
    ) -> None:
        """Every stdout line is JSON with ts (UTC, Z), level, snake_case event, service,
        instance; actor events carry their actor."""
        now = datetime.now(UTC)

        async def seed_work() -> None:
            connection = await asyncpg.connect(system_dsn)
            try:
                buyer = await seed.user(connection, "u1")
                await seed.invoice(
                    connection, "inv_due", user_id=buyer, expires_at=now - timedelta(hours=1)
                )
                await seed.key(
                    connection, "k1", status="cooldown", cooldown_until=now - timedelta(minutes=1)
                )
            finally:
                await connection.close()

        asyncio.run(seed_work())
        daemon = start_daemon()
        daemon.wait_ready()
        wait_until(
            lambda: {"pending_invoices_expired", "provider_keys_recovered"} <= set(daemon.events()),
            timeout=10,
            what="the actors' log events",
        )
        code, stdout, _ = daemon.terminate()
        assert code == 0

        raw = [line for line in stdout.splitlines() if line.strip()]
        lines = [json.loads(line) for line in raw]
        assert len(lines) >= 4
        for line in lines:
            assert isinstance(line, dict)
            assert TS.match(line["ts"]), line
            stamp = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
            assert abs(stamp - now) < timedelta(minutes=5)
            assert line["level"] in {"debug", "info", "warning", "error", "critical"}
            assert SNAKE.match(line["event"]), line
            assert line["service"] == "nproxyd"
            assert line["instance"] == INSTANCE
        by_event = {line["event"]: line for line in lines}
        assert by_event["pending_invoices_expired"]["actor"] == "invoice-expirer"
        assert by_event["pending_invoices_expired"]["expired_count"] == 1
        assert by_event["provider_keys_recovered"]["actor"] == "key-pool-recoverer"
        assert by_event["provider_keys_recovered"]["recovered_count"] == 1
        assert "daemon_started" in by_event
        assert system_dsn not in stdout

    def test_sigterm_exits_0_within_the_grace_period_and_logs_daemon_stopped(
        self, start_daemon: Any
    ) -> None:
        """SIGTERM stops the daemon with exit 0 within the grace period, logging daemon_stopped."""
        daemon = start_daemon()
        daemon.wait_ready()
        started = time.monotonic()
        code, _, stderr = daemon.terminate(timeout=GRACE_SECONDS + 5)
        assert code == 0, stderr[-3000:]
        assert time.monotonic() - started < GRACE_SECONDS
        events = daemon.events()
        assert "shutdown_requested" in events
        assert events[-1] == "daemon_stopped"
        assert "shutdown_grace_exceeded" not in events
        assert http_status(daemon.base_url + "/livez", timeout=1) is None

    def test_status_command_prints_a_table_naming_every_actor(
        self, start_daemon: Any, system_dsn: str, tmp_path: Path
    ) -> None:
        """`nproxyd status --url` prints a table with one row per actor of the running daemon."""
        daemon = start_daemon()
        daemon.wait_ready()
        env = nproxyd_env(dsn=system_dsn, state_dir=tmp_path / "cli")

        result = run_nproxyd(["status", "--url", daemon.base_url], env, timeout=20)

        assert result.returncode == 0, result.stderr
        rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
        assert set(ACTORS) <= set(rows)
        assert INSTANCE in result.stdout
        for actor in ACTORS:
            assert "ok" in rows[actor].split(), rows[actor]

    def test_status_command_without_a_daemon_exits_69(self, tmp_path: Path) -> None:
        """`nproxyd status` against a port where nothing listens exits 69 with one line."""
        env = nproxyd_env(dsn="", state_dir=tmp_path)
        result = run_nproxyd(["status", "--url", f"http://127.0.0.1:{free_port()}"], env)
        assert result.returncode == 69
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr


def seed_due_subscription(dsn: str) -> None:
    """One subscription whose paid period ends tomorrow: due for a renewal invoice."""
    now = datetime.now(UTC)

    async def insert() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await seed.plan(connection)
            await seed.subscription(
                connection,
                "sub_due",
                period_start=now - timedelta(days=29),
                period_end=now + timedelta(days=1),
            )
        finally:
            await connection.close()

    asyncio.run(insert())


class TestShutdown:
    def test_a_tick_longer_than_the_grace_period_is_cut_off(
        self, start_daemon: Any, system_dsn: str
    ) -> None:
        """SIGTERM during a tick that outlasts the grace period stops the daemon after the grace
        period, logging shutdown_grace_exceeded."""
        seed_due_subscription(system_dsn)
        daemon = start_daemon(
            **{"payment.simulated.latency_ms": 60_000, "daemon.shutdown_grace_seconds": 2}
        )
        wait_until(
            lambda: (
                http_status(daemon.base_url + "/status") == 200
                and daemon.get_json("/status")[1]["actors"]["renewal-scheduler"]["running"]
            ),
            timeout=15,
            what="the renewal tick to hang on the provider",
        )
        started = time.monotonic()
        code, _, stderr = daemon.terminate(timeout=10)
        took = time.monotonic() - started
        assert code == 0, stderr[-3000:]
        assert 1.5 <= took < 6, took
        events = daemon.events()
        assert "shutdown_grace_exceeded" in events
        assert events[-1] == "daemon_stopped"

    def test_a_second_sigterm_forces_an_immediate_stop(
        self, start_daemon: Any, system_dsn: str
    ) -> None:
        """A second SIGTERM while a tick is still running stops at once, without the grace."""
        seed_due_subscription(system_dsn)
        daemon = start_daemon(
            **{"payment.simulated.latency_ms": 60_000, "daemon.shutdown_grace_seconds": 30}
        )
        wait_until(
            lambda: (
                http_status(daemon.base_url + "/status") == 200
                and daemon.get_json("/status")[1]["actors"]["renewal-scheduler"]["running"]
            ),
            timeout=15,
            what="the renewal tick to hang on the provider",
        )
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: "shutdown_requested" in daemon.events(), timeout=5, what="shutdown_requested"
        )
        daemon.process.send_signal(signal.SIGTERM)
        code, _, stderr = daemon.processes.finish(daemon.process, timeout=10)
        assert time.monotonic() - started < 5
        assert code == 0, stderr[-3000:]
        events = daemon.events()
        assert "shutdown_forced" in events
        assert "shutdown_grace_exceeded" not in events
        assert events[-1] == "daemon_stopped"


class TestRunConfiguration:
    def test_a_disabled_actor_is_not_run_and_not_required_for_readiness(
        self, start_daemon: Any
    ) -> None:
        """With the renewal scheduler disabled the daemon is ready without it and never runs it."""
        daemon = start_daemon(**{"actors.renewal_scheduler.enabled": False})
        daemon.wait_ready()
        _, ready = daemon.get_json("/readyz")
        _, status = daemon.get_json("/status")
        assert set(ready["actors"]) == set(ACTORS) - {"renewal-scheduler"}
        assert set(status["actors"]) == set(ACTORS) - {"renewal-scheduler"}

    def test_http_listen_on_a_busy_port_exits_75_naming_http_listen(
        self, processes: Processes, system_dsn: str, tmp_path: Path
    ) -> None:
        """A port another process listens on stops start-up with 75 (a temporary failure) and
        one line naming http.listen, before READY."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            process = processes.start(["run"], daemon_env(system_dsn, tmp_path, port))
            code, _, stderr = processes.finish(process, timeout=20)
        assert code == 75
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert "http.listen" in lines[0]

    def test_secrets_never_reach_logs_or_http(
        self, processes: Processes, system_dsn: str, tmp_path: Path
    ) -> None:
        """The DSN password and API keys appear in no log line and no HTTP answer."""
        password = "dsn-sekrit-4711"
        dsn = system_dsn.replace("://postgres:@", f"://postgres:{password}@", 1)
        if dsn == system_dsn:
            pytest.skip("needs the pgserver DSN form (trust authentication)")
        port = free_port()
        env = daemon_env(
            dsn,
            tmp_path,
            port,
            **{
                "payment.nowpayments.api_key": "np-sekrit-0815",
                "email.smtp.password": "smtp-sekrit-1234",
            },
        )
        daemon = Daemon(processes, env, port)
        daemon.wait_ready()
        answers = [daemon.get(path)[1] for path in ("/livez", "/readyz", "/metrics", "/status")]
        code, stdout, stderr = daemon.terminate()
        assert code == 0, stderr[-3000:]
        for secret in (password, "np-sekrit-0815", "smtp-sekrit-1234"):
            assert secret not in stdout
            assert secret not in stderr
            assert all(secret not in answer for answer in answers)


class TestSdNotify:
    def test_ready_then_watchdog_pings_then_stopping(
        self, processes: Processes, system_dsn: str, tmp_path: Path, short_tmp: Path
    ) -> None:
        """With NOTIFY_SOCKET and WATCHDOG_USEC=1s: READY=1, WATCHDOG=1 every ~0.5 s, and
        STOPPING=1 after SIGTERM."""
        path = short_tmp / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(path))
            notify.settimeout(0.2)
            port = free_port()
            env = daemon_env(system_dsn, tmp_path, port)
            env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000")
            daemon = Daemon(processes, env, port)
            received: list[tuple[float, list[str]]] = []

            def receive(timeout: float, until: str | None = None) -> None:
                """Record every datagram with its arrival time; stop early at *until*."""
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        datagram = notify.recv(4096)
                    except TimeoutError:
                        continue
                    fields = datagram.decode().split("\n")
                    received.append((time.monotonic(), fields))
                    if until in fields:
                        return
                if until is not None:
                    raise AssertionError(f"no {until} within {timeout} s; got {received}")

            receive(15, until="READY=1")
            ready_at = len(received)
            receive(2.2)
            daemon.process.send_signal(signal.SIGTERM)
            receive(GRACE_SECONDS, until="STOPPING=1")
            code, _, stderr = processes.finish(daemon.process, timeout=GRACE_SECONDS + 5)

        assert code == 0, stderr[-3000:]
        assert all("READY=1" not in fields for _, fields in received[: ready_at - 1])
        pings = [at for at, fields in received[ready_at:] if "WATCHDOG=1" in fields]
        assert len(pings) >= 3, received
        gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
        assert all(0.3 <= gap <= 0.9 for gap in gaps), gaps
        for _, fields in received:
            if "WATCHDOG=1" in fields:
                assert any(field.startswith("STATUS=") for field in fields)
        stopping = [i for i, (_, fields) in enumerate(received) if "STOPPING=1" in fields]
        assert stopping
        assert stopping[0] > ready_at


class TestConfigAndExitCodes:
    def test_bad_env_value_exits_78_with_one_line_naming_the_key(self, tmp_path: Path) -> None:
        """A non-number renewal lead time exits 78 with one stderr line naming the key."""
        env = nproxyd_env(
            dsn="postgresql://u@127.0.0.1:1/x",
            state_dir=tmp_path,
            settings={"billing.renewal_lead_time_hours": "abc"},
        )
        result = run_nproxyd(["run"], env, timeout=20)
        assert result.returncode == 78
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "billing.renewal_lead_time_hours" in lines[0]
        assert result.stdout == ""

    @pytest.mark.parametrize(
        ("toml", "key"),
        [
            ("[billing]\nrenewal_lead_hours = 48\n", "billing.renewal_lead_hours"),
            ("[actors.mail_sender]\nmax_attempt = 3\n", "actors.mail_sender.max_attempt"),
            ("[bogus]\nx = 1\n", "bogus"),
        ],
    )
    def test_unknown_key_in_the_toml_file_exits_78_naming_it(
        self, tmp_path: Path, toml: str, key: str
    ) -> None:
        """An unknown key in the config file exits 78 with one stderr line naming it."""
        config = tmp_path / "nproxyd.toml"
        config.write_text(toml)
        env = nproxyd_env(dsn="postgresql://u@127.0.0.1:1/x", state_dir=tmp_path)
        for command in (["-c", str(config), "run"], ["-c", str(config), "check-config"]):
            result = run_nproxyd(command, env, timeout=20)
            assert result.returncode == 78, (command, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert key in lines[0]
            assert "unknown" in lines[0]

    def test_check_config_redacts_every_secret(self, tmp_path: Path) -> None:
        """check-config prints the config as JSON with secrets as *** and never their values."""
        secret_file = tmp_path / "api_key"
        secret_file.write_text("file-sekrit-999\n")
        env = nproxyd_env(
            dsn="postgresql://billing:db-sekrit-456@db.internal:5432/nproxy",
            state_dir=tmp_path,
            settings={
                "payment.nowpayments.api_key": "sekrit-123",
                "email.smtp.password": "smtp-sekrit-789",
                "email.smtp.username": "mailer",
            },
        )
        result = run_nproxyd(["check-config"], env, timeout=20)
        assert result.returncode == 0, result.stderr
        config = json.loads(result.stdout)
        assert config["database"]["dsn"] == "***"
        assert config["payment"]["nowpayments"]["api_key"] == "***"
        assert config["email"]["smtp"]["password"] == "***"
        assert config["email"]["smtp"]["username"] == "mailer"
        for secret in ("sekrit-123", "smtp-sekrit-789", "db-sekrit-456"):
            assert secret not in result.stdout
            assert secret not in result.stderr

        env.pop("NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY")
        env["NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY_FILE"] = str(secret_file)
        result = run_nproxyd(["check-config"], env, timeout=20)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["payment"]["nowpayments"]["api_key"] == "***"
        assert "file-sekrit-999" not in result.stdout + result.stderr

    def test_once_with_an_unreachable_database_exits_69_without_the_password(
        self, tmp_path: Path
    ) -> None:
        """`once` against a closed port exits 69 with one clear line that hides the password."""
        env = nproxyd_env(dsn="postgresql://u:pw@127.0.0.1:1/x", state_dir=tmp_path)
        result = run_nproxyd(["once", "invoice-expirer"], env, timeout=25)
        assert result.returncode == 69
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "database" in lines[0]
        assert "pw" not in result.stderr
        assert "pw" not in result.stdout
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize(
        "args",
        [
            ["frobnicate"],
            [],
            ["once", "no-such-actor"],
            ["once", "invoice-expirer", "--now", "yesterday"],
            ["mail", "retry"],
            ["mail", "dead", "--limit", "0"],
            ["run", "--no-such-flag"],
        ],
    )
    def test_bad_command_line_exits_64(self, tmp_path: Path, args: list[str]) -> None:
        """A bad command line exits 64 without a traceback."""
        env = nproxyd_env(dsn="postgresql://u:pw@127.0.0.1:1/x", state_dir=tmp_path)
        result = run_nproxyd(args, env, timeout=20)
        assert result.returncode == 64, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


class TestMigrate:
    @pytest.mark.anyio
    async def test_three_concurrent_migrations_on_an_empty_database_apply_each_version_once(
        self, pg_server: TestServer, tmp_path: Path
    ) -> None:
        """Three `nproxyd migrate` at once on an empty database all exit 0; each version once.

        The test holds the migration lock until all three wait for it, so they really run at
        once (otherwise the first often finishes before the others connect).
        """
        name = f"nproxyd_migrate_{int(time.time() * 1000)}"
        admin = await asyncpg.connect(pg_server.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(pg_server.admin_dsn, name)
        holder = await asyncpg.connect(dsn)
        processes = Processes(tmp_path / "logs")
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            env = nproxyd_env(dsn=dsn, state_dir=tmp_path / "state")
            started = [processes.start(["migrate"], env) for _ in range(3)]
            with anyio.fail_after(15):
                while await holder.fetchval(WAITING_FOR_LOCK) < 3:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)  # all three are now polling for the lock
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            results = [processes.finish(process, timeout=25) for process in started]
            rows = await holder.fetch(
                "SELECT version, count(*) AS n FROM nproxyd_schema_migrations GROUP BY version"
            )
            tables = await holder.fetchval(
                "SELECT count(*) FROM information_schema.tables"
                " WHERE table_name IN ('payment_invoices', 'mail_outbox', 'provider_keys')"
            )
        finally:
            processes.kill_all()
            await holder.close()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        for code, _, stderr in results:
            assert code == 0, stderr[-3000:]
        assert {row["version"]: row["n"] for row in rows} == {m.version: 1 for m in available()}
        assert tables == 3


class TestPostgresRestart:
    def test_daemon_survives_postgres_stop_and_start(
        self, processes: Processes, tmp_path: Path
    ) -> None:
        """With its PostgreSQL stopped, the daemon stays up with /readyz 503; once PostgreSQL
        is back, /readyz returns to 200 in the same process."""
        postgres = ThrowawayPostgres()
        try:
            postgres.init()
            postgres.start()
            port = free_port()
            env = daemon_env(
                postgres.dsn, tmp_path, port, **{"database.connect_timeout_seconds": 2}
            )
            migrated = run_nproxyd(["migrate"], env, timeout=25)
            assert migrated.returncode == 0, migrated.stderr
            daemon = Daemon(processes, env, port)
            daemon.wait_ready()

            postgres.stop("fast")
            wait_until(
                lambda: http_status(daemon.base_url + "/readyz") == 503,
                timeout=10,
                what="/readyz 503 with PostgreSQL down",
            )
            status, body = daemon.get_json("/readyz")
            assert status == 503
            assert body["database"] is False
            assert daemon.get("/livez")[0] == 200
            assert daemon.get("/metrics")[0] == 200
            status, body = daemon.get_json("/status")
            assert status == 200
            assert body["database"] is False
            time.sleep(1.5)  # a few failed ticks while the database is gone
            assert daemon.process.poll() is None

            postgres.start()
            wait_until(
                lambda: http_status(daemon.base_url + "/readyz") == 200,
                timeout=20,
                what="/readyz back to 200 after PostgreSQL restarted",
            )
            assert daemon.process.poll() is None
            events = daemon.events()
            assert events.count("daemon_started") == 1
            assert "tick_failed" in events
            assert "actor_crashed" not in events
            code, _, stderr = daemon.terminate()
            assert code == 0, stderr[-3000:]
        finally:
            processes.kill_all()
            postgres.cleanup()
