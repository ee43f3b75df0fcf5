"""Soak benchmark: sustained load through the real ``nproxyd run``; does memory stay flat?

For ``NPROXYD_SOAK_MINUTES`` (default 20) a load generator adds, every second, 25 subscriptions
entering the renewal window, 25 pending invoices expiring now and 25 mails from another writer,
to a daemon running with the default intervals and delivering to a local SMTP server. A
subscription's period ends 72 h 30 s after it is added, so it enters the window through its
upper edge 30 s later, as a paid period does when time passes, and the next renewal tick
invoices it. (One ending inside the window already, below the renewal watermark, would wait
for the hourly full pass: docs/design.md §2.) The daemon starts in that steady state: before
it starts, one renewal interval of the load is added with period ends already inside the
window, so its first tick does the work every later tick does, as after any restart under
load. The daemon's RSS is sampled every 10 s; the figure is the growth between minute 5 and
the end, each the median of a minute's samples (target: under 2 MB).
With ``NPROXYD_SOAK_TRACE=1`` the daemon also writes tracemalloc
differences (minute 5 against the later minutes) to ``soak-tracemalloc.txt`` in the state
directory, whose path is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import psutil

from tests.bench.bench_idle import REPO_ROOT, _stop, _wait_started
from tests.bench.common import (
    Databases,
    Figure,
    connected,
    median,
    note,
    seed_plan,
    seeding,
    significant,
)
from tests.fakes.smtp import FakeSmtpServer
from tests.pg import TestServer

PER_SECOND = 25
WARM_UP_SECONDS = 300.0
SAMPLE_EVERY_SECONDS = 10.0
# RSS "at" a time is the median of the samples of the minute from then: a sample taken while a
# renewal tick runs reads its batches in flight (up to 1.7 MB for seconds), not growth.
LEVEL_SECONDS = 60.0
GROWTH_TARGET_MB = 2.0
RENEWAL_INTERVAL_SECONDS = 300  # the default; the backlog is one interval of the load
ENTERS_WINDOW = timedelta(hours=72, seconds=30)  # a new subscription's period end, from now
SITE_DIR = Path(__file__).resolve().parent / "tracemalloc_site"

_ADD_LOAD = """
WITH batch AS (
    SELECT $1::text || '-' || g AS key FROM generate_series(1, $2::int) AS g
), users AS (
    INSERT INTO users (id, email, created_at)
    SELECT 'u-' || key, 'u-' || key || '@example.com', $3 FROM batch
    RETURNING id
), subscriptions AS (
    INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually, activated_at,
        current_period_start, current_period_end, created_at, updated_at)
    SELECT 's-' || key, 'u-' || key, 'plan_1', 'active', true, $3 - interval '27 days',
        $3 - interval '27 days', $3 + $4::interval, $3 - interval '27 days', $3
    FROM batch JOIN users ON users.id = 'u-' || batch.key
    RETURNING id
), invoices AS (
    INSERT INTO payment_invoices (user_id, provider, provider_invoice_id, status, currency,
        amount_crypto, amount_usd, expires_at, created_at, updated_at)
    SELECT 'u-' || key, 'simulated', 'old-' || key, 'pending', 'USDT', 29, 29, $3,
        $3 - interval '1 day', $3 - interval '1 day'
    FROM batch JOIN users ON users.id = 'u-' || batch.key
    RETURNING id
)
INSERT INTO mail_outbox (to_address, subject, body, message_id)
SELECT 'u-' || key || '@example.com', 'Hello', 'A mail from another writer.',
    '<soak-' || key || '@example.com>'
FROM batch
"""


def soak_minutes() -> float:
    return float(os.environ.get("NPROXYD_SOAK_MINUTES", "20"))


async def run(server: TestServer) -> list[Figure]:
    bench = "soak"
    minutes = soak_minutes()
    async with Databases(server, "soak") as databases:
        dsn = await databases.clone()
        async with seeding(dsn) as connection:
            await seed_plan(connection)
        await _backlog(dsn)
        with (
            tempfile.TemporaryDirectory(prefix="nproxyd-bench-soak-") as state,
            FakeSmtpServer() as smtp,
        ):
            samples = await _soak(dsn, Path(state), smtp.port, minutes)
    at_warm_up = _level(samples, WARM_UP_SECONDS)
    at_end = _level(samples, samples[-1][0] - LEVEL_SECONDS)
    note(bench, f"RSS MB by minute: {_by_minute(samples)}")
    growth = at_end - at_warm_up
    return [
        Figure(
            name="soak_rss_growth",
            measured=f"{significant(growth)}MB",
            reference=f"{significant(at_warm_up)}MB(RSS in minute 5; {significant(at_end)}MB"
            f" in the last minute, medians)",
            ratio=growth / GROWTH_TARGET_MB,
            target=f"<{GROWTH_TARGET_MB:g}MB",
            passed=growth < GROWTH_TARGET_MB,
        )
    ]


async def _soak(dsn: str, state: Path, smtp_port: int, minutes: float) -> list[tuple[float, float]]:
    env = _daemon_env(dsn, state, smtp_port, minutes)
    stdout_path = state / "nproxyd.stdout"
    with stdout_path.open("wb") as stdout, (state / "nproxyd.stderr").open("wb") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "nproxyd", "run"],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        await _wait_started(daemon, stdout_path)
        samples: list[tuple[float, float]] = []
        async with anyio.create_task_group() as group:
            group.start_soon(_load, dsn, minutes * 60, name="soak-load")
            await _sample(daemon.pid, minutes * 60, samples)
        return samples
    finally:
        _stop(daemon)
        if "NPROXYD_SOAK_TRACE_FILE" in env:
            note("soak", f"tracemalloc differences in {env['NPROXYD_SOAK_TRACE_FILE']}")


def _daemon_env(dsn: str, state: Path, smtp_port: int, minutes: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPROXYD_", "NOTIFY_SOCKET"))}
    env.update(
        NPROXYD__DATABASE__DSN=dsn,
        NPROXYD__DAEMON__STATE_DIR=str(state),
        NPROXYD__HTTP__LISTEN="127.0.0.1:0",
        NPROXYD__EMAIL__TRANSPORT="smtp",
        NPROXYD__EMAIL__SMTP__HOST="127.0.0.1",
        NPROXYD__EMAIL__SMTP__PORT=str(smtp_port),
        PYTHONUNBUFFERED="1",
    )
    if os.environ.get("NPROXYD_SOAK_TRACE") == "1":
        trace = Path(tempfile.gettempdir()) / f"soak-tracemalloc-{os.getpid()}.txt"
        marks = [WARM_UP_SECONDS + step * (minutes * 60 - WARM_UP_SECONDS) / 3 for step in range(4)]
        env.update(
            PYTHONPATH=os.pathsep.join([str(SITE_DIR), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
            NPROXYD_SOAK_SNAPSHOTS=",".join(f"{mark:.0f}" for mark in marks),
            NPROXYD_SOAK_TRACE_FILE=str(trace),
        )
    return env


async def _backlog(dsn: str) -> None:
    """The load of the renewal interval before the run: the daemon starts in a steady state.

    Under sustained load a starting daemon finds a renewal interval's worth of subscriptions
    already inside the window (and as many invoices and mails); its first tick does the work
    every later tick does, so minute 5 is past the first tick with work, as after any
    restart under load.
    """
    now = datetime.now(UTC)
    async with connected(dsn) as connection:
        for second in range(1, RENEWAL_INTERVAL_SECONDS + 1):
            ends_in = timedelta(hours=72, seconds=-second)
            await connection.execute(_ADD_LOAD, f"backlog-{second}", PER_SECOND, now, ends_in)


async def _load(dsn: str, seconds: float) -> None:
    """``PER_SECOND`` renewals, expiries and mails every second, stamped with the real time."""
    started = time.monotonic()
    async with connected(dsn) as connection:
        second = 0
        while time.monotonic() - started < seconds:
            now = datetime.now(UTC)
            await connection.execute(_ADD_LOAD, f"{second}", PER_SECOND, now, ENTERS_WINDOW)
            second += 1
            await anyio.sleep(max(0.0, started + second - time.monotonic()))


async def _sample(pid: int, seconds: float, samples: list[tuple[float, float]]) -> None:
    process = psutil.Process(pid)
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        samples.append((elapsed, process.memory_info().rss / 1_000_000))
        await anyio.sleep(SAMPLE_EVERY_SECONDS)
    samples.append((time.monotonic() - started, process.memory_info().rss / 1_000_000))


def _level(samples: list[tuple[float, float]], start: float) -> float:
    """The median RSS of the samples taken in the ``LEVEL_SECONDS`` from ``start``."""
    return median([rss for seconds, rss in samples if start <= seconds <= start + LEVEL_SECONDS])


def _by_minute(samples: list[tuple[float, float]]) -> str:
    last: dict[int, float] = {}
    for seconds, rss in samples:
        last[int(seconds // 60)] = rss
    return " ".join(f"{minute}:{significant(rss)}" for minute, rss in sorted(last.items()))
