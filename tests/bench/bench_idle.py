"""Idle benchmark (docs/design.md §6): nothing due among a million subscriptions and invoices.

One tick of each actor, built exactly as the daemon builds them (``nproxyd.app.build_actors``),
timed as the median of 20 ticks. Then the real daemon (``python -m nproxyd run`` with the
default intervals) runs against the same database, and its CPU time and RSS are sampled with
psutil for 20 s after it logged ``daemon_started``.

The data is relative to the real time, because the daemon reads the real clock: subscriptions
end after the renewal window, pending invoices expire tomorrow or never, outbox mail is sent,
cooldown keys cool down until tomorrow and key balances were checked at seeding time.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import anyio
import msgspec
import psutil

from nproxyd.app import Stores, Wiring, build_actors, mail_transport, payment_provider
from nproxyd.core.channels import Outbox
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import Config
from nproxyd.core.messages import OutboxReady
from nproxyd.runtime.actor import Actor
from tests.bench.common import (
    Databases,
    Figure,
    Stopwatch,
    duration,
    note,
    opened,
    padded,
    seed_invoice_history,
    seed_plan,
    seed_subscriptions,
    seed_users,
    seeding,
    significant,
)
from tests.pg import TestServer

SUBSCRIPTIONS = 1_000_000
SENT_MAILS = 100_000
TICKS = 20
TICK_TARGET_SECONDS = 0.020
CPU_TARGET_PERCENT = 1.0
RSS_TARGET_MB = 100.0
SAMPLE_SECONDS = 20.0
START_TIMEOUT_SECONDS = 60.0
REPO_ROOT = Path(__file__).resolve().parents[2]


async def seed_idle(dsn: str, now: datetime) -> None:
    async with seeding(dsn) as connection:
        await seed_plan(connection)
        await seed_users(connection, SUBSCRIPTIONS)
        cycle_start = await seed_subscriptions(connection, count=SUBSCRIPTIONS, due=0, now=now)
        await seed_invoice_history(
            connection, count=SUBSCRIPTIONS, now=now, cycle_start=cycle_start
        )
        await connection.execute(
            f"INSERT INTO mail_outbox (id, status, to_address, subject, body, message_id,"
            f" attempts, next_attempt_at, created_at, sent_at, updated_at)"
            f" SELECT {padded('m')}, 'sent', {padded('u')} || '@example.com', 'Renewal', 'Body',"
            f"  '<sent-' || g || '@nproxy.localhost>', 1, $2, $2, $2, $2"
            f" FROM generate_series(1, $1) AS g",
            SENT_MAILS,
            now - timedelta(days=3),
        )
        await connection.execute(
            "INSERT INTO provider_keys (id, provider, label, status, consecutive_failures,"
            " cooldown_until, balance, balance_checked_at)"
            " SELECT 'key_' || g, 'nano-banana', 'key ' || g,"
            "  CASE WHEN g <= 20 THEN 'active' WHEN g <= 25 THEN 'cooldown'"
            "       ELSE 'manual_review' END,"
            "  CASE WHEN g <= 20 THEN 0 ELSE 2 END,"
            "  CASE WHEN g BETWEEN 21 AND 25 THEN $1::timestamptz + interval '1 day' END,"
            "  100, $1"
            " FROM generate_series(1, 27) AS g",
            now,
        )


async def median_ticks(dsn: str, config: Config, now: datetime) -> dict[str, float]:
    """Median seconds of ``TICKS`` ticks of every actor, built by ``build_actors``."""
    clock = SystemClock()
    sender, receiver = anyio.create_memory_object_stream[OutboxReady](64)
    medians: dict[str, float] = {}
    async with opened(dsn) as db:
        with sender, receiver:
            actors = build_actors(
                Wiring(
                    config=config,
                    clock=clock,
                    stores=Stores.for_database(db),
                    instance="bench",
                    outbox=Outbox(sender),
                    provider=payment_provider(config, clock),
                    transport=mail_transport(config),
                )
            )
            for name, actor in actors.items():
                medians[name] = await _median_tick(actor, now)
    return medians


async def _median_tick(actor: Actor, now: datetime) -> float:
    seconds = []
    for _ in range(TICKS):
        with Stopwatch() as watch:
            report = await actor.tick(now)
        seconds.append(watch.seconds)
    note("idle", f"{actor.name}: median {duration(statistics.median(seconds))}, {report}")
    return statistics.median(seconds)


def idle_config(state_dir: Path) -> Config:
    """The defaults, with the maildir (nothing is delivered) under ``state_dir``."""
    config = Config()
    maildir = msgspec.structs.replace(config.email.maildir, path=str(state_dir / "maildir"))
    email = msgspec.structs.replace(config.email, maildir=maildir)
    return msgspec.structs.replace(config, email=email)


class DaemonSample(msgspec.Struct, frozen=True, kw_only=True):
    cpu_percent: float
    max_rss_mb: float
    startup_seconds: float
    readyz_status: int


async def sample_daemon(dsn: str, state_dir: Path) -> DaemonSample:
    """Start ``nproxyd run``; sample CPU and RSS for ``SAMPLE_SECONDS`` once it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPROXYD_", "NOTIFY_SOCKET"))}
    env.update(
        NPROXYD__DATABASE__DSN=dsn,
        NPROXYD__DAEMON__STATE_DIR=str(state_dir),
        NPROXYD__HTTP__LISTEN="127.0.0.1:0",
        PYTHONUNBUFFERED="1",
    )
    stdout_path = state_dir / "nproxyd.stdout"
    with stdout_path.open("wb") as stdout, (state_dir / "nproxyd.stderr").open("wb") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "nproxyd", "run"],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        with Stopwatch() as startup:
            port = await _wait_started(daemon, stdout_path)
        cpu_percent, max_rss_mb = await _sample(daemon.pid)
        # Asked after sampling, so the request costs the sample nothing: an idle daemon whose
        # actors fail would be cheap for the wrong reason.
        return DaemonSample(
            cpu_percent=cpu_percent,
            max_rss_mb=max_rss_mb,
            startup_seconds=startup.seconds,
            readyz_status=await _readyz(port),
        )
    finally:
        _stop(daemon)


async def _wait_started(daemon: subprocess.Popen[bytes], stdout_path: Path) -> int:
    """Wait for the ``daemon_started`` log line; returns the HTTP port it names."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        for line in stdout_path.read_bytes().splitlines():
            if b"daemon_started" in line:
                return int(json.loads(line)["http_port"])
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nproxyd did not start (exit code {daemon.poll()})")
        await anyio.sleep(0.05)


async def _readyz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status


async def _sample(pid: int) -> tuple[float, float]:
    """Percent of one core and the largest RSS in MB over ``SAMPLE_SECONDS``."""
    process = psutil.Process(pid)
    before = process.cpu_times()
    max_rss = process.memory_info().rss
    with Stopwatch() as watch:
        while watch.started + SAMPLE_SECONDS > time.perf_counter():
            await anyio.sleep(1.0)
            max_rss = max(max_rss, process.memory_info().rss)
    after = process.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    return 100 * busy / watch.seconds, max_rss / 1_000_000


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


async def run(server: TestServer) -> list[Figure]:
    bench = "idle"
    now = datetime.now(UTC).replace(microsecond=0)
    async with Databases(server, "idle") as databases:
        dsn = await databases.clone()
        with Stopwatch() as watch:
            await seed_idle(dsn, now)
        note(
            bench, f"seeded {SUBSCRIPTIONS} subscriptions and invoices in {duration(watch.seconds)}"
        )
        with tempfile.TemporaryDirectory(prefix="nproxyd-bench-idle-") as state:
            medians = await median_ticks(dsn, idle_config(Path(state)), now)
            sample = await sample_daemon(dsn, Path(state))
        note(bench, f"daemon ready after {duration(sample.startup_seconds)}: {sample}")
    healthy = sample.readyz_status == 200
    figures = [
        Figure(
            name=f"idle_tick_{name}",
            measured=duration(seconds),
            reference=f"{duration(TICK_TARGET_SECONDS)}(limit)",
            ratio=seconds / TICK_TARGET_SECONDS,
            target=f"<{duration(TICK_TARGET_SECONDS)}",
            passed=seconds < TICK_TARGET_SECONDS,
        )
        for name, seconds in medians.items()
    ]
    figures.append(
        Figure(
            name="idle_daemon_cpu",
            measured=f"{significant(sample.cpu_percent)}%",
            reference=f"{CPU_TARGET_PERCENT:g}%(limit, one core)",
            ratio=sample.cpu_percent / CPU_TARGET_PERCENT,
            target=f"<{CPU_TARGET_PERCENT:g}%",
            passed=healthy and sample.cpu_percent < CPU_TARGET_PERCENT,
        )
    )
    figures.append(
        Figure(
            name="idle_daemon_rss",
            measured=f"{significant(sample.max_rss_mb)}MB",
            reference=f"{RSS_TARGET_MB:g}MB(limit)",
            ratio=sample.max_rss_mb / RSS_TARGET_MB,
            target=f"<{RSS_TARGET_MB:g}MB",
            passed=healthy and sample.max_rss_mb < RSS_TARGET_MB,
        )
    )
    return figures
