"""The operations HTTP surface of the real composition: /livez, /readyz, /metrics, /status.

Each test builds the daemon exactly as ``app.run_daemon`` does (real PostgreSQL, simulated
provider, maildir), runs ``Daemon.run`` in a task and talks to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import asyncpg
import pytest
import structlog
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from nproxyd import app, cli
from nproxyd.actors.invoice_expirer import ExpirerPorts, ExpirerSettings, InvoiceExpirer
from nproxyd.core.clock import SystemClock, parse_instant
from nproxyd.core.config import Config, load
from nproxyd.core.errors import StoreError, SupervisorGaveUp
from nproxyd.core.messages import ExpirerReport, OutboxReady
from nproxyd.runtime.actor import Actor
from nproxyd.runtime.catalogue import CATALOGUE, database_metrics
from nproxyd.runtime.daemon import Daemon
from nproxyd.runtime.status import render
from nproxyd.store.database import Database
from tests import seed
from tests.pg import TestServer

pytestmark = pytest.mark.anyio

ACTORS = {
    "invoice-expirer",
    "renewal-scheduler",
    "mail-sender",
    "key-pool-recoverer",
    "payment-watcher",
}
KEY_STATUSES = {"active", "cooldown", "manual_review", "disabled"}

# docs/design.md §4, metric name as exposed -> (type, label names): the one catalogue.
CONTRACT_METRICS: dict[str, tuple[str, set[str]]] = {
    spec.name: (spec.kind, set(spec.labels)) for spec in CATALOGUE
}


@pytest.fixture
def sync_dsn(pg_server: TestServer) -> Iterator[str]:
    """A fresh migrated database for a synchronous test (one that calls ``anyio.run``)."""
    dsn = asyncio.run(pg_server.clone("http"))
    yield dsn
    name = dsn.split("?", 1)[0].rsplit("/", 1)[-1]

    async def drop() -> None:
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(drop())


def make_config(dsn: str, tmp_path: Path, **env: str) -> Config:
    """A config like the daemon's: the test database, an ephemeral port, maildir in tmp."""
    environ = {
        "NPROXYD__DATABASE__DSN": dsn,
        "NPROXYD__DATABASE__AUTO_MIGRATE": "false",
        "NPROXYD__HTTP__LISTEN": "127.0.0.1:0",
        "NPROXYD__DAEMON__STATE_DIR": str(tmp_path / "state"),
        "NPROXYD__DAEMON__INSTANCE_ID": "http-surface-test",
        "NPROXYD__DAEMON__SHUTDOWN_GRACE_SECONDS": "5",
        "NPROXYD__EMAIL__TRANSPORT": "maildir",
        "NPROXYD__EMAIL__MAILDIR__PATH": str(tmp_path / "maildir"),
        **{f"NPROXYD__{key.upper()}": value for key, value in env.items()},
    }
    return load(None, environ)


class Running:
    """A daemon running in a task of the test's event loop."""

    def __init__(self, daemon: Daemon, session: aiohttp.ClientSession) -> None:
        self.daemon = daemon
        self.session = session
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.exit_code: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.server.port}"

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base_url + path) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def metrics(self) -> dict[str, Metric]:
        status, text = await self.get("/metrics")
        assert status == 200
        # A counter's family drops ``_total``; keyed with it, the nproxyd_mail_dead_total
        # counter and the nproxyd_mail_dead gauge stay apart.
        return {
            family.name + ("_total" if family.type == "counter" else ""): family
            for family in text_string_to_metric_families(text)
        }


@asynccontextmanager
async def running_daemon(
    config: Config, *, replace: Mapping[str, Actor] | None = None
) -> AsyncIterator[Running]:
    """Build the daemon with ``app.build_daemon`` (optionally swapping actors), run it."""
    clock = SystemClock()
    async with app.open_components(config, clock) as components:
        daemon = app.build_daemon(components, replace=replace, environ={})
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            handle = Running(daemon, session)

            async def run() -> None:
                try:
                    handle.exit_code = await daemon.run()
                except SupervisorGaveUp as exc:
                    handle.error = exc
                finally:
                    handle.done.set()

            async with anyio.create_task_group() as group:
                group.start_soon(run, name="daemon-under-test")
                with anyio.fail_after(5):
                    while daemon.server.port == 0 and not handle.done.is_set():
                        await anyio.sleep(0.01)
                yield handle
                daemon.shutdown.set()
                with anyio.fail_after(10):
                    await handle.done.wait()


async def eventually(
    probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], *, timeout: float = 10
) -> Any:
    """Poll *probe* until *check* accepts its value; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s; last: {value!r}")
        await anyio.sleep(0.05)


def sample(families: Mapping[str, Metric], name: str, **labels: str) -> float:
    """The value of the sample *name* with exactly *labels* (KeyError if absent)."""
    for family in families.values():
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return float(item.value)
    raise KeyError(f"{name}{labels}")


def family_of(families: Mapping[str, Metric], exposed: str) -> Metric:
    """The family that exposes *exposed* (the parser drops a counter's ``_total``)."""
    if exposed in families:
        return families[exposed]
    for family in families.values():
        if any(item.name == exposed for item in family.samples):
            return family
    raise AssertionError(f"metric {exposed} missing from /metrics")


class RaisingExpiryStore:
    """An expiry store whose database keeps failing."""

    def __init__(self) -> None:
        self.calls = 0

    async def expire_due(self, now: datetime, batch_size: int) -> AsyncIterator[int]:
        self.calls += 1
        raise StoreError("database error 42P01: relation is gone")
        yield 0  # an async generator, as the port is


class LoopBreaker:
    """An actor whose ticks succeed but whose loop then crashes (its interval raises).

    That is a bug in the loop, not a failed tick, so it reaches the supervisor. The first
    ``crashes`` loops crash; later ones run normally.
    """

    def __init__(self, name: str, *, crashes: int) -> None:
        self.name = name
        self.crashes = crashes
        self.ticks = 0
        self._armed = False

    @property
    def interval_seconds(self) -> float:
        if self._armed:
            self._armed = False
            self.crashes -= 1
            raise RuntimeError("interval lost")
        return 60.0

    async def tick(self, now: datetime) -> ExpirerReport:
        self.ticks += 1
        self._armed = self.crashes > 0
        return ExpirerReport()


async def ready(running: Running) -> tuple[int, Any]:
    answer: tuple[int, Any] = await eventually(
        lambda: running.get("/readyz"), lambda answer: answer[0] == 200
    )
    return answer


class TestLivenessAndReadiness:
    async def test_livez_answers_200(self, dsn: str, tmp_path: Path) -> None:
        """/livez answers 200 with a JSON body while the event loop runs."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            status, body = await running.get("/livez")
        assert status == 200
        assert body == {"live": True}

    async def test_readyz_is_200_with_every_actor_once_all_ticked(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """/readyz turns 200 once every actor ticked, with a JSON entry per actor."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            _, body = await ready(running)
        assert body["ready"] is True
        assert body["database"] is True
        assert set(body["actors"]) == ACTORS
        for name, actor in body["actors"].items():
            assert actor["ok"] is True, name
            assert actor["seconds_since_success"] is not None
            assert 0 <= actor["seconds_since_success"] < 10

    async def test_readyz_is_503_naming_an_actor_whose_ticks_keep_failing(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """An actor whose store keeps raising makes /readyz 503 and is the one marked not ok."""
        config = make_config(dsn, tmp_path, actors__invoice_expirer__interval_seconds="0.2")
        store = RaisingExpiryStore()
        broken = InvoiceExpirer(
            ExpirerSettings(interval_seconds=0.2, batch_size=100),
            ExpirerPorts(store=store),
            SystemClock(),
        )
        async with running_daemon(config, replace={"invoice-expirer": broken}) as running:
            status_doc = await eventually(
                lambda: running.get("/status"),
                lambda answer: (
                    all(a["ticks"] >= 1 for a in answer[1]["actors"].values())
                    and answer[1]["actors"]["invoice-expirer"]["consecutive_failures"] >= 2
                ),
            )
            status, body = await running.get("/readyz")
        assert status == 503
        assert body["ready"] is False
        assert body["database"] is True
        expirer_ready = body["actors"]["invoice-expirer"]
        assert expirer_ready["ok"] is False
        assert expirer_ready["seconds_since_success"] is None
        assert {"reason": "actor_stalled", "actor": "invoice-expirer"}.items() <= (
            body["reasons"][0].items()
        )
        assert all(body["actors"][name]["ok"] for name in ACTORS - {"invoice-expirer"})
        expirer = status_doc[1]["actors"]["invoice-expirer"]
        assert expirer["last_outcome"] == "error"
        assert "relation is gone" in expirer["last_error"]
        assert store.calls >= 2

    async def test_readyz_is_503_while_the_database_refuses_connections(
        self, dsn: str, tmp_path: Path, pg_server: TestServer
    ) -> None:
        """/readyz is 503 with database false while PostgreSQL is unreachable, 200 after."""
        name = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            async with running_daemon(make_config(dsn, tmp_path)) as running:
                await ready(running)
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
                _, body = await eventually(
                    lambda: running.get("/readyz"), lambda answer: answer[0] == 503
                )
                assert body["database"] is False
                assert set(body["actors"]) == ACTORS
                live_status, _ = await running.get("/livez")
                assert live_status == 200
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                _, body = await ready(running)
                assert body["database"] is True
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()


class TestMetrics:
    async def test_the_text_format_is_named_in_the_content_type(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """/metrics says it is the Prometheus text format 0.0.4, the format it writes."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            url = running.base_url + "/metrics"
            async with running.session.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == (
                    "text/plain; version=0.0.4; charset=utf-8"
                )

    async def test_every_contract_metric_is_exposed_with_its_type_and_labels(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """/metrics parses as Prometheus text and has every docs/design.md §4 metric and label."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            await ready(running)
            families = await running.metrics()
        for exposed, (kind, label_names) in CONTRACT_METRICS.items():
            family = family_of(families, exposed)
            assert family.type == kind, exposed
            samples = [s for s in family.samples if s.name.startswith(exposed)]
            # Skip reasons are only known once a candidate is skipped.
            assert samples or label_names == {"reason"}, exposed
            for item in samples:
                assert set(item.labels) - {"le"} == label_names, (exposed, item)
            if "actor" in label_names:
                assert {s.labels["actor"] for s in samples} == ACTORS, exposed
        ticks = family_of(families, "nproxyd_actor_ticks_total")
        assert {s.labels["outcome"] for s in ticks.samples} >= {"ok", "degraded", "error"}
        failures = family_of(families, "nproxyd_mail_failures_total")
        assert {s.labels["kind"] for s in failures.samples} >= {"transient", "permanent"}
        keys = family_of(families, "nproxyd_provider_keys")
        assert {s.labels["status"] for s in keys.samples} == KEY_STATUSES
        histogram = family_of(families, "nproxyd_actor_tick_duration_seconds")
        assert {
            "nproxyd_actor_tick_duration_seconds_bucket",
            "nproxyd_actor_tick_duration_seconds_count",
            "nproxyd_actor_tick_duration_seconds_sum",
        } <= {s.name for s in histogram.samples}

    async def test_listener_gauge_is_absent_where_no_listener_runs(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """Without a mail sender there is no NOTIFY listener, and no listener gauge to read as
        a session that is down; with one, the gauge is there."""
        quiet = make_config(dsn, tmp_path, actors__mail_sender__enabled="false")
        async with running_daemon(quiet) as running:
            await ready(running)
            without = await running.metrics()
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            await ready(running)
            with_listener = await running.metrics()
        assert "nproxyd_listener_connected" not in without
        assert "nproxyd_listener_connected" in with_listener

    async def test_counters_move_after_seeded_work(
        self, dsn: str, db: Database, tmp_path: Path
    ) -> None:
        """Seeded due work (an expired invoice, a due renewal, a cooled-down key) moves the
        counters and gauges: expired, created, sent, recovered, ticks, last success."""
        now = datetime.now(UTC)
        pool = db.pool
        await seed.plan(pool)
        buyer = await seed.user(pool, "u_expired")
        await seed.invoice(pool, "inv_due", user_id=buyer, expires_at=now - timedelta(hours=1))
        await seed.invoice(pool, "inv_later", user_id=buyer, expires_at=now + timedelta(days=1))
        await seed.subscription(
            pool,
            "sub_due",
            period_start=now - timedelta(days=29),
            period_end=now + timedelta(days=1),
        )
        await seed.key(
            pool, "key_cool", status="cooldown", cooldown_until=now - timedelta(minutes=1)
        )
        await seed.key(pool, "key_review", status="manual_review", failures=3)

        async with running_daemon(make_config(dsn, tmp_path)) as running:

            def done(families: dict[str, Metric]) -> bool:
                return (
                    sample(families, "nproxyd_mail_sent_total") >= 1
                    and sample(families, "nproxyd_provider_keys_recovered_total") >= 1
                    and sample(families, "nproxyd_invoices_expired_total") >= 1
                )

            families = await eventually(running.metrics, done)
            families = await running.metrics()  # gauges refreshed after the mail was sent

        assert sample(families, "nproxyd_invoices_expired_total") == 1
        assert sample(families, "nproxyd_renewal_invoices_created_total") == 1
        assert sample(families, "nproxyd_mail_sent_total") == 1
        assert sample(families, "nproxyd_mail_dead_total") == 0
        assert sample(families, "nproxyd_provider_keys_recovered_total") == 1
        assert sample(families, "nproxyd_outbox_pending") == 0
        assert sample(families, "nproxyd_provider_keys", status="active") == 1
        assert sample(families, "nproxyd_provider_keys", status="manual_review") == 1
        assert sample(families, "nproxyd_provider_keys", status="cooldown") == 0
        for actor in ACTORS:
            assert sample(families, "nproxyd_actor_ticks_total", actor=actor, outcome="ok") >= 1
            assert sample(families, "nproxyd_actor_tick_duration_seconds_count", actor=actor) >= 1
            last = sample(families, "nproxyd_actor_last_success_timestamp_seconds", actor=actor)
            assert abs(last - time.time()) < 60
        rows = await db.pool.fetch(
            "SELECT id, status FROM payment_invoices WHERE user_id = $1", buyer
        )
        statuses = {row["id"]: row["status"] for row in rows}
        assert statuses == {"inv_due": "expired", "inv_later": "pending"}

    async def test_a_restarted_actor_is_counted_in_metrics_and_status(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """A loop crash is restarted by the supervisor and counted in restarts_total and /status."""
        breaker = LoopBreaker("key-pool-recoverer", crashes=1)
        async with running_daemon(
            make_config(dsn, tmp_path), replace={"key-pool-recoverer": breaker}
        ) as running:
            families = await eventually(
                running.metrics,
                lambda f: (
                    sample(f, "nproxyd_actor_restarts_total", actor="key-pool-recoverer") >= 1
                ),
            )
            _, status = await eventually(
                lambda: running.get("/status"),
                lambda answer: answer[1]["actors"]["key-pool-recoverer"]["ticks"] >= 1,
            )
            await ready(running)
        assert sample(families, "nproxyd_actor_restarts_total", actor="key-pool-recoverer") == 1
        assert sample(families, "nproxyd_actor_restarts_total", actor="invoice-expirer") == 0
        assert status["actors"]["key-pool-recoverer"]["restarts"] == 1
        assert status["supervisor_healthy"] is True
        assert breaker.ticks == 2
        assert running.error is None
        assert running.exit_code == 0


class TestStatus:
    async def test_status_reports_instance_actors_queue_outbox_and_keys(
        self, dsn: str, db: Database, tmp_path: Path
    ) -> None:
        """/status JSON has instance, uptime, per-actor tick facts, queue depth and counts."""
        now = datetime.now(UTC)
        await seed.key(db.pool, "k_active")
        await seed.key(db.pool, "k_disabled", status="disabled")
        await db.pool.execute(
            "INSERT INTO mail_outbox (id, status, to_address, subject, body, message_id,"
            " attempts, next_attempt_at, last_error)"
            " VALUES ('dead_1', 'dead', 'x@example.com', 's', 'b', '<dead_1@x>', 8, now(), 'no')"
        )
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            await ready(running)
            status, body = await running.get("/status")
        assert status == 200
        assert body["instance"] == "http-surface-test"
        assert body["uptime_seconds"] >= 0
        assert body["ready"] is True
        assert body["database"] is True
        assert body["queue_depth"] == 0
        assert body["outbox"] == {"pending": 0, "dead": 1, "oldest_pending_age_seconds": 0}
        assert body["renewal_claims"] == {"claimed": 0, "retry": 0, "failed": 0}
        assert body["reasons"] == []
        assert body["provider_keys"] == {"active": 1, "disabled": 1}
        assert body["payments"] == {"awaiting_activation": 0, "oldest_wait_seconds": 0.0}
        assert set(body["actors"]) == ACTORS
        for name, actor in body["actors"].items():
            assert actor["last_outcome"] == "ok", name
            assert actor["consecutive_failures"] == 0
            assert actor["restarts"] == 0
            assert actor["last_duration_seconds"] >= 0
            assert actor["last_error"] is None
            last_tick = parse_instant(actor["last_tick_at"])
            assert abs(last_tick - now) < timedelta(seconds=30)
            assert actor["last_tick_at"].endswith("Z")
            assert parse_instant(actor["next_due_at"]) > last_tick
            assert actor["interval_seconds"] > 0

    async def test_unknown_path_is_a_404_json_body_without_traceback(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """An unknown path gets 404 JSON, a wrong method 405 JSON; never a traceback."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            status, body = await running.get("/no/such/path")
            async with running.session.post(running.base_url + "/status") as response:
                post_status = response.status
                post_type = response.content_type
                post_body = await response.text()
        assert status == 404
        assert isinstance(body, dict)
        assert body.get("error")
        assert "Traceback" not in str(body)
        assert post_status == 405
        assert post_type == "application/json"
        assert "Traceback" not in post_body

    async def test_status_table_of_a_live_daemon_names_every_actor(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """render() of a live /status document has one table row per actor."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            await ready(running)
            _, body = await running.get("/status")
        table = render(body)
        rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
        assert set(rows) >= ACTORS
        outcome = rows["actor"].index("outcome")
        assert {actor: rows[actor][outcome] for actor in ACTORS} == dict.fromkeys(ACTORS, "ok")
        assert "http-surface-test" in table


class TestRender:
    def test_render_makes_a_table_with_every_actor(self) -> None:
        """render() prints a header and one aligned row per actor, '-' for missing values."""
        actor = {
            "ready": True,
            "last_outcome": "ok",
            "last_tick_at": "2026-03-12T11:00:00.000Z",
            "last_duration_seconds": 0.012,
            "next_due_at": "2026-03-12T11:01:00.000Z",
            "consecutive_failures": 0,
            "restarts": 0,
        }
        status = {
            "instance": "host-1",
            "uptime_seconds": 12.5,
            "ready": False,
            "database": True,
            "queue_depth": 3,
            "outbox": {"pending": 2, "dead": 1},
            "provider_keys": {"active": 4},
            "actors": {
                "invoice-expirer": actor,
                "renewal-scheduler": actor,
                "mail-sender": {**actor, "last_outcome": "error", "consecutive_failures": 4},
                "key-pool-recoverer": {"ready": False},
                "payment-watcher": actor,
            },
            "payments": {"awaiting_activation": 2, "oldest_wait_seconds": 60.0},
        }
        table = render(status)
        lines = table.splitlines()
        header = next(line for line in lines if line.startswith("actor"))
        assert "outcome" in header
        assert "failures" in header
        assert "restarts" in header
        rows = {line.split()[0]: line.split() for line in lines if line.split()}
        assert set(rows) >= ACTORS
        assert rows["mail-sender"][2] == "error"
        assert rows["mail-sender"][6] == "4"
        assert rows["key-pool-recoverer"][1:] == ["no", "-", "-", "-", "-", "-", "-"]
        assert "awaiting_activation=2" in " ".join(rows["payments"])
        assert "host-1" in table
        assert "12.5" in table
        body_lines = [line for line in lines if line.split() and line.split()[0] in ACTORS]
        assert len({line.index(line.split()[1]) for line in body_lines}) == 1  # aligned
        assert table.endswith("\n")


class TestSupervisorGivesUp:
    async def test_daemon_raises_supervisor_gave_up_when_a_loop_keeps_crashing(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """With max_restarts=0, one actor-loop crash stops the daemon with SupervisorGaveUp."""
        config = make_config(dsn, tmp_path, daemon__max_restarts="0")
        breaker = LoopBreaker("key-pool-recoverer", crashes=5)
        async with running_daemon(config, replace={"key-pool-recoverer": breaker}) as running:
            with anyio.fail_after(10):
                await running.done.wait()
        assert isinstance(running.error, SupervisorGaveUp)
        assert running.error.actor == "key-pool-recoverer"
        assert running.exit_code is None
        assert running.daemon.supervisor.healthy is False

    def test_cli_run_exits_70_when_the_supervisor_gives_up(
        self,
        sync_dsn: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`nproxyd run` exits 70 with one stderr line naming the actor when the supervisor
        gives up."""
        real_build = app.build_actors

        def build_with_breaker(*args: Any, **kwargs: Any) -> dict[str, Actor]:
            actors = real_build(*args, **kwargs)
            actors["mail-sender"] = LoopBreaker("mail-sender", crashes=5)
            return actors

        monkeypatch.setattr(app, "build_actors", build_with_breaker)
        for name, value in {
            "NPROXYD__DATABASE__DSN": sync_dsn,
            "NPROXYD__HTTP__LISTEN": "127.0.0.1:0",
            "NPROXYD__DAEMON__STATE_DIR": str(tmp_path / "state"),
            "NPROXYD__DAEMON__MAX_RESTARTS": "0",
            "NPROXYD__EMAIL__MAILDIR__PATH": str(tmp_path / "maildir"),
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("NPROXYD_CONFIG", raising=False)
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        try:
            code = cli.main(["run"])
        finally:
            structlog.reset_defaults()
        out, err = capsys.readouterr()
        assert code == 70
        assert err.strip().splitlines() == ["nproxyd: actor mail-sender restarted too often"]
        assert '"event": "supervisor_gave_up"' in out
        assert '"event": "daemon_stopped"' in out


class NoopActor:
    """An actor whose ticks do nothing (a mail sender that never sends, for example)."""

    def __init__(self, name: str, *, interval_seconds: float = 60.0) -> None:
        self.name = name
        self.interval_seconds = interval_seconds

    async def tick(self, now: datetime) -> ExpirerReport:
        return ExpirerReport()


class HeldActor:
    """Ticks return at once until ``hold`` is set; a held tick runs until ``release`` is set."""

    def __init__(self, name: str, *, interval_seconds: float) -> None:
        self.name = name
        self.interval_seconds = interval_seconds
        self.hold = False
        self.release = anyio.Event()

    async def tick(self, now: datetime) -> ExpirerReport:
        if self.hold:
            await self.release.wait()
        return ExpirerReport()


def actor_running(name: str, seconds: float) -> Callable[[tuple[int, Any]], bool]:
    """Accepts a /readyz answer once *name*'s current tick has run longer than *seconds*."""

    def check(answer: tuple[int, Any]) -> bool:
        running = answer[1]["actors"][name]["tick_running_seconds"]
        return running is not None and running > seconds

    return check


def reason_codes(body: dict[str, Any]) -> set[str]:
    return {reason["reason"] for reason in body["reasons"]}


class TestHonestHealth:
    async def test_a_long_tick_keeps_readyz_200_until_max_tick_seconds(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """A tick running past 3 intervals keeps /readyz 200; past health.max_tick_seconds, 503."""
        held = HeldActor("invoice-expirer", interval_seconds=0.2)
        config = make_config(dsn, tmp_path, health__max_tick_seconds="2")
        async with running_daemon(config, replace={"invoice-expirer": held}) as running:
            await ready(running)
            held.hold = True
            try:
                long_status, long_body = await eventually(
                    lambda: running.get("/readyz"), actor_running("invoice-expirer", 1.0)
                )
                hung_status, hung_body = await eventually(
                    lambda: running.get("/readyz"), actor_running("invoice-expirer", 2.2)
                )
            finally:
                held.release.set()
        assert long_status == 200, long_body
        assert long_body["actors"]["invoice-expirer"]["ok"] is True
        assert long_body["actors"]["invoice-expirer"]["tick_running_seconds"] <= 2
        assert hung_status == 503
        stalled = [r for r in hung_body["reasons"] if r["reason"] == "actor_stalled"]
        assert [r["actor"] for r in stalled] == ["invoice-expirer"]
        assert "running" in stalled[0]["detail"]

    async def test_a_wedged_outbox_makes_readyz_503_with_outbox_stuck(
        self, dsn: str, db: Database, tmp_path: Path
    ) -> None:
        """Due mail waiting 2 h while no sender sends: /readyz 503 outbox_stuck, age in metrics."""
        await db.pool.execute(
            "INSERT INTO mail_outbox (id, status, to_address, subject, body, message_id,"
            " next_attempt_at) VALUES ('m_old', 'pending', 'a@example.com', 's', 'b', '<m@x>',"
            " now() - interval '2 hours')"
        )
        idle_sender = NoopActor("mail-sender")
        async with running_daemon(
            make_config(dsn, tmp_path), replace={"mail-sender": idle_sender}
        ) as running:
            status, body = await eventually(
                lambda: running.get("/readyz"),
                lambda answer: all(
                    a["seconds_since_tick"] is not None for a in answer[1]["actors"].values()
                ),
            )
            families = await running.metrics()
        assert status == 503
        assert reason_codes(body) == {"outbox_stuck"}
        assert sample(families, "nproxyd_outbox_oldest_pending_age_seconds") >= 7190
        assert sample(families, "nproxyd_outbox_pending") == 1
        assert sample(families, "nproxyd_ready") == 0

    async def test_a_provider_failing_every_call_is_degraded_and_turns_readyz_503(
        self, dsn: str, db: Database, tmp_path: Path
    ) -> None:
        """Every provider call failing: degraded renewal ticks, counted failures, /status names
        the error, and after health.provider_failing_seconds /readyz 503 provider_failing."""
        now = datetime.now(UTC)
        await seed.plan(db.pool)
        await seed.subscription(
            db.pool,
            "sub_due",
            period_start=now - timedelta(days=29),
            period_end=now + timedelta(days=1),
        )
        config = make_config(
            dsn,
            tmp_path,
            payment__simulated__failure_rate="1",
            actors__renewal_scheduler__interval_seconds="0.3",
            billing__retry_base_seconds="0.1",
            billing__retry_max_seconds="0.2",
            health__provider_failing_seconds="1",
        )
        async with running_daemon(config) as running:
            _, body = await eventually(
                lambda: running.get("/readyz"),
                lambda answer: "provider_failing" in reason_codes(answer[1]),
            )
            _, status = await running.get("/status")
            families = await running.metrics()
        assert reason_codes(body) == {"provider_failing"}
        renewal = status["actors"]["renewal-scheduler"]
        assert renewal["last_outcome"] == "degraded"
        assert "claimed renewals failed" in renewal["last_error"]
        assert "simulated provider failure" in renewal["last_item_error"]
        assert renewal["ticks_degraded"] >= 2
        assert renewal["degraded_for_seconds"] >= 1
        ticks = "nproxyd_actor_ticks_total"
        assert sample(families, ticks, actor="renewal-scheduler", outcome="degraded") >= 2
        assert sample(families, ticks, actor="renewal-scheduler", outcome="ok") == 0
        assert sample(families, "nproxyd_renewal_failures_total", kind="transient") >= 2
        assert sample(families, "nproxyd_renewal_invoices_created_total") == 0

    async def test_ready_gauge_is_kept_by_the_daemon_without_any_request(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """nproxyd_ready turns 1 on the daemon's own checks, with no request to any endpoint."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            registry = running.daemon.metrics.registry

            async def ready_gauge() -> float | None:
                return registry.sample("nproxyd_ready")

            value = await eventually(ready_gauge, lambda v: v == 1, timeout=25)
        assert value == 1

    async def test_database_gauges_are_absent_while_the_database_refuses_connections(
        self, dsn: str, tmp_path: Path, pg_server: TestServer
    ) -> None:
        """With PostgreSQL refusing connections the database gauges vanish (scrape_error 1)
        instead of keeping their last values; they come back with the database."""
        name = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            async with running_daemon(make_config(dsn, tmp_path)) as running:
                await ready(running)
                before = await running.metrics()
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
                down = await eventually(
                    running.metrics,
                    lambda f: sample(f, "nproxyd_database_scrape_error") == 1,
                )
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                after = await eventually(
                    running.metrics,
                    lambda f: sample(f, "nproxyd_database_scrape_error") == 0,
                )
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
        for spec in database_metrics():
            assert spec.name in before, spec.name
            assert spec.name not in down or not down[spec.name].samples, spec.name
            assert spec.name in after, spec.name
        assert sample(down, "nproxyd_ready") == 0

    async def test_dropped_wake_ups_are_counted_in_metrics(self, dsn: str, tmp_path: Path) -> None:
        """Wake-ups offered to a full channel are dropped and counted in messages_dropped_total."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            await ready(running)
            channel = running.daemon.queries.channel
            for _ in range(200):
                channel.offer(OutboxReady(count=1))
            dropped = channel.dropped
            families = await running.metrics()
        assert dropped > 0
        assert sample(families, "nproxyd_messages_dropped_total") == dropped


class TestConcurrentRequests:
    async def test_requests_at_once_share_one_database_check(
        self, dsn: str, tmp_path: Path
    ) -> None:
        """Requests that arrive together while the database is slow share one health read
        (one pool connection), so a burst of requests cannot take the pool from the actors."""
        async with running_daemon(make_config(dsn, tmp_path)) as running:
            await ready(running)
            blocker, observer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
            try:
                held = blocker.transaction()
                await held.start()
                await blocker.execute("LOCK TABLE mail_outbox IN ACCESS EXCLUSIVE MODE")
                requests = [asyncio.ensure_future(running.get("/readyz")) for _ in range(6)]
                most = 0
                while not all(request.done() for request in requests):
                    waiting = await observer.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%outbox_pending%' AND pid <> pg_backend_pid()"
                    )
                    most = max(most, waiting)
                    await anyio.sleep(0.02)
                await held.rollback()
                answers = [request.result() for request in requests]
            finally:
                await blocker.close()
                await observer.close()
        assert most == 1
        assert [(status, body["database"]) for status, body in answers] == [(503, False)] * 6
