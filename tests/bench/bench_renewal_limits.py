"""Renewal against its physical limits: the DB-bound tick against one set-based statement, and
the tick with nothing due but a window full of invoiced subscriptions.

``renewal_vs_set_based``: 10,000 due among 1,000,000 subscriptions (each with an older paid
invoice), simulated provider latency 0, default settings. The reference is
``renewal_two_statements.sql`` (next to this file): the same claims, invoices and mails written
set-based on an identical copy, in the two transactions the claim protocol needs (claims
committed before any provider call, then invoices, mails and claim completions). A second
reference, printed as a note, is ``renewal_set_based.sql``: the same rows in one statement,
claims written once and no claim before a provider call (which invariant 4 forbids), so the
note shows what the protocol itself costs (docs/benchmarks.md, "Renewal against its limits").
``renewal_idle_window``: 100,000 subscriptions inside
the 72 h window, every cycle already invoiced (by the web API, so no claim of nproxyd names
them), nothing due; the figure is a tick after the first one (which rules the window out).
Both are A/B interleaved (A/B, then B/A) over ``REPETITIONS`` repetitions; the median and the
spread are printed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from importlib import resources

import anyio

from nproxyd.actors.renewal_scheduler import RenewalPorts, RenewalScheduler
from nproxyd.app import OUTBOX_READY_BUFFER, renewal_settings
from nproxyd.core.channels import Outbox
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import Config
from nproxyd.core.messages import OutboxReady
from nproxyd.store.stores import RenewalStore
from tests.bench.bench_renewal import (
    bench_config,
    seed_subscribers,
    simulated_provider,
    timed_tick,
)
from tests.bench.common import (
    LEAD,
    NOW,
    Databases,
    Figure,
    Stopwatch,
    checkpoint,
    connected,
    duration,
    median,
    note,
    opened,
    padded,
    renewal_counts,
    seed_plan,
    seed_subscriptions,
    seed_users,
    seeding,
    spread,
)
from tests.pg import TestServer

REPETITIONS = 3
TOTAL = 1_000_000
DUE = 10_000
SPEED_TARGET = 0.85
WINDOW = 100_000
IDLE_TARGET_SECONDS = 0.005
WARM_TICKS = 5
# The connections a DB-bound tick uses at once: its producer, two committers, the lease keeper.
WARM_CONNECTIONS = 4
SET_BASED = resources.files("tests.bench").joinpath("renewal_set_based.sql").read_text()
TWO_STATEMENTS = resources.files("tests.bench").joinpath("renewal_two_statements.sql").read_text()
# The candidate query as it was before cycles were ruled out: for every subscription in the
# window, a probe of payment_invoices and one of the claims (the idle figure's reference).
PROBING_CANDIDATES = """
SELECT s.id
FROM subscriptions AS s
WHERE s.status = 'active' AND s.renews_manually
  AND s.current_period_end > $1 AND s.current_period_end <= $2
  AND NOT EXISTS (
      SELECT 1 FROM payment_invoices AS i
      WHERE i.subscription_id = s.id
        AND i.created_at >= coalesce(s.current_period_start, s.activated_at, s.created_at))
  AND NOT EXISTS (
      SELECT 1 FROM nproxyd_renewal_claims AS c
      WHERE c.subscription_id = s.id
        AND c.cycle_start = coalesce(s.current_period_start, s.activated_at, s.created_at)
        AND (c.state = 'done' OR c.available_at > $1))
ORDER BY s.current_period_end, s.id
LIMIT 500
"""


async def set_based(dsn: str) -> tuple[float, tuple[int, int, int]]:
    """The one statement on ``dsn``; returns (seconds, (claims, invoices, mails))."""
    async with connected(dsn) as connection:
        await connection.fetch(f"EXPLAIN {SET_BASED}", NOW, NOW + LEAD)  # warm, as the tick's
        await checkpoint(connection)
        with Stopwatch() as watch:
            async with connection.transaction():
                # Its fastest plan: the claims table is empty when planned, so the planner
                # would probe it by sequential scan per row while the statement fills it, and
                # join users by hashing the whole table; by index, as the scheduler reads.
                await connection.execute("SET LOCAL enable_seqscan = off")
                row = await connection.fetchrow(SET_BASED, NOW, NOW + LEAD)
    assert row is not None
    return watch.seconds, (row["claims"], row["invoices"], row["mails"])


async def two_statements(dsn: str) -> tuple[float, tuple[int, int, int]]:
    """The protocol's reference on ``dsn``: claims committed, then everything else in one
    statement; returns (seconds, (claims completed, invoices, mails)).

    The claims' statistics are refreshed between the two, untimed, as for the statement's
    best plan (the planner would otherwise take the claims table for empty).
    """
    claim, store = TWO_STATEMENTS.split("\n-- store --\n")
    async with connected(dsn) as connection:
        await connection.fetch(f"EXPLAIN {claim}", NOW, NOW + LEAD)  # warm, as the tick's
        await connection.fetch(f"EXPLAIN {store}", NOW)
        await checkpoint(connection)
        with Stopwatch() as claiming:
            async with connection.transaction():
                await connection.execute("SET LOCAL enable_seqscan = off")
                await connection.execute(claim, NOW, NOW + LEAD)
        await connection.execute("ANALYZE nproxyd_renewal_claims")
        with Stopwatch() as storing:
            async with connection.transaction():
                await connection.execute("SET LOCAL enable_seqscan = off")
                row = await connection.fetchrow(store, NOW)
    assert row is not None
    return claiming.seconds + storing.seconds, (row["claims"], row["invoices"], row["mails"])


async def vs_set_based(server: TestServer) -> list[Figure]:
    """The DB-bound tick and the protocol's two statements on identical copies, interleaved;
    the one statement after each pair, as a note."""
    bench = "renewal_vs_set_based"
    ticks: list[float] = []
    references: list[float] = []
    singles: list[float] = []
    complete = True
    async with Databases(server, "renewal_s") as databases:
        base = await databases.clone()
        with Stopwatch() as watch:
            await seed_subscribers(base, count=TOTAL, due=DUE, history=True)
        note(bench, f"seeded {TOTAL} subscriptions and invoices in {duration(watch.seconds)}")
        for repetition in range(REPETITIONS):
            tick_first = repetition % 2 == 0
            for run_tick in (tick_first, not tick_first):
                if run_tick:
                    seconds, done = await _tick_on_copy(databases, base, bench)
                    complete = complete and done
                    ticks.append(seconds)
                else:
                    references.append(
                        await _reference_on_copy(databases, base, bench, two_statements)
                    )
            singles.append(await _reference_on_copy(databases, base, bench, set_based))
    speed = median(references) / median(ticks)
    single = median(singles)
    note(
        bench,
        f"one statement (claims written once, no claim before a provider call): median"
        f" {duration(single)}{spread(singles)}; the two statements are"
        f" {single / median(references):.3f}x of it, the tick {single / median(ticks):.3f}x",
    )
    return [
        Figure(
            name=bench,
            measured=f"{DUE / median(ticks):.0f}/s{spread(ticks)}",
            reference=f"{DUE / median(references):.0f}/s{spread(references)}(two statements)",
            ratio=speed,
            target=f">={SPEED_TARGET}x",
            passed=complete and speed >= SPEED_TARGET,
        )
    ]


async def _tick_on_copy(databases: Databases, base: str, bench: str) -> tuple[float, bool]:
    """One tick on a fresh copy: (seconds, whether every due slot got its invoice and mail)."""
    dsn = await databases.copy(base)
    async with connected(dsn) as connection:
        await checkpoint(connection)
    seconds, report = await timed_tick(dsn, bench_config(latency_ms=0), NOW, warm=WARM_CONNECTIONS)
    invoices, mails = await renewal_counts(dsn, NOW)
    note(bench, f"tick {duration(seconds)}: {invoices} invoices, {mails} mails")
    await databases.drop(dsn)
    return seconds, invoices == mails == DUE == report.created_count


async def _reference_on_copy(
    databases: Databases,
    base: str,
    bench: str,
    reference: Callable[[str], Awaitable[tuple[float, tuple[int, int, int]]]],
) -> float:
    """One run of a reference (``set_based`` or ``two_statements``) on a fresh copy."""
    dsn = await databases.copy(base)
    seconds, counts = await reference(dsn)
    assert counts == (DUE, DUE, DUE), counts
    note(bench, f"{reference.__name__.replace('_', ' ')} {duration(seconds)}: {counts}")
    await databases.drop(dsn)
    return seconds


async def seed_invoiced_window(dsn: str) -> None:
    """``WINDOW`` subscriptions ending inside the window, each with an invoice of its cycle."""
    async with seeding(dsn) as connection:
        await seed_plan(connection)
        await seed_users(connection, WINDOW)
        cycle_start = await seed_subscriptions(connection, count=WINDOW, due=WINDOW, now=NOW)
        await connection.execute(
            f"INSERT INTO payment_invoices (id, user_id, subscription_id, provider,"
            f" provider_invoice_id, status, currency, amount_crypto, amount_usd, expires_at,"
            f" created_at, updated_at)"
            f" SELECT {padded('i')}, {padded('u')}, {padded('s')}, 'nowpayments', 'np_' || g,"
            f"  'pending', 'USDT', 29, 29, $2::timestamptz + interval '1 day', $3, $3"
            f" FROM generate_series(1, $1) AS g",
            WINDOW,
            NOW,
            cycle_start + timedelta(days=26),
        )


async def probing_query(dsn: str) -> float:
    """The former candidate query once (warm); returns seconds."""
    async with connected(dsn) as connection:
        await connection.fetch(PROBING_CANDIDATES, NOW, NOW + LEAD)  # plan and cache warm
        with Stopwatch() as watch:
            rows = await connection.fetch(PROBING_CANDIDATES, NOW, NOW + LEAD)
    assert rows == []
    return watch.seconds


@asynccontextmanager
async def running_scheduler(dsn: str, config: Config) -> AsyncIterator[RenewalScheduler]:
    """A scheduler on its own pool, as the daemon holds them between ticks."""
    sender, receiver = anyio.create_memory_object_stream[OutboxReady](OUTBOX_READY_BUFFER)
    async with opened(dsn) as db:
        with sender, receiver:
            ports = RenewalPorts(
                store=RenewalStore(db), provider=simulated_provider(config), outbox=Outbox(sender)
            )
            yield RenewalScheduler(renewal_settings(config, "bench"), ports, SystemClock())


async def idle_window(server: TestServer) -> list[Figure]:
    """A tick with nothing due and ``WINDOW`` invoiced subscriptions in the window.

    The scheduler and its pool live across ticks, as in the daemon. The first tick rules the
    window out; its row versions are vacuumed, as autovacuum would; ``WARM_TICKS`` more let
    the pool's prepared statements settle; then each repetition times one tick against one
    run of the former probing query.
    """
    bench = "renewal_idle_window"
    ticks: list[float] = []
    probes: list[float] = []
    async with Databases(server, "renewal_i") as databases:
        dsn = await databases.clone()
        with Stopwatch() as watch:
            await seed_invoiced_window(dsn)
        note(bench, f"seeded {WINDOW} invoiced subscriptions in {duration(watch.seconds)}")
        async with running_scheduler(dsn, bench_config(latency_ms=0)) as scheduler:
            with Stopwatch() as watch:
                report = await scheduler.tick(NOW)
            note(bench, f"first tick {duration(watch.seconds)} (rules the window out): {report}")
            complete = report.created_count == 0
            async with connected(dsn) as connection:
                await connection.execute("VACUUM ANALYZE")  # what autovacuum does next
            for _ in range(WARM_TICKS):
                await scheduler.tick(NOW)
            for repetition in range(REPETITIONS):
                tick_first = repetition % 2 == 0
                for run_tick in (tick_first, not tick_first):
                    if run_tick:
                        with Stopwatch() as watch:
                            report = await scheduler.tick(NOW)
                        complete = complete and report.created_count == report.candidates == 0
                        ticks.append(watch.seconds)
                        note(bench, f"idle tick {duration(watch.seconds)}: {report}")
                    else:
                        probes.append(await probing_query(dsn))
                        note(bench, f"probing candidate query {duration(probes[-1])}")
    return [
        Figure(
            name=bench,
            measured=f"{duration(median(ticks))}{spread(ticks)}",
            reference=f"{duration(median(probes))}{spread(probes)}(probe per subscription)",
            ratio=median(ticks) / IDLE_TARGET_SECONDS,
            target=f"<{duration(IDLE_TARGET_SECONDS)}",
            passed=complete and median(ticks) < IDLE_TARGET_SECONDS,
        )
    ]
