"""Renewal benchmarks (docs/design.md §6): provider-bound against the original worker, DB-bound.

The reference is the original worker's loop (``createUpcomingRenewalInvoices`` in
/work/shared/seed/original-worker-renewal.diff), written here with asyncpg: one query for the
due subscriptions, then for each one in sequence a look-up of any invoice of the cycle, one
provider call and one INSERT. It ran on a copy of the same data with the same simulated
provider.
"""

from __future__ import annotations

import random
from datetime import datetime
from importlib import resources
from statistics import median

import anyio
import msgspec

from nproxyd.actors.renewal_scheduler import RenewalPorts, RenewalScheduler
from nproxyd.adapters.payment_simulated import SimulatedPaymentProvider
from nproxyd.app import OUTBOX_READY_BUFFER, renewal_settings
from nproxyd.core.channels import Outbox
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import Config
from nproxyd.core.messages import OutboxReady, RenewalReport
from nproxyd.core.ports import InvoiceRequest
from nproxyd.core.rules import order_id
from nproxyd.store.sql import parse_statements
from nproxyd.store.stores import RenewalStore
from tests.bench.common import (
    LEAD,
    NOW,
    Databases,
    Figure,
    Stopwatch,
    connected,
    duration,
    note,
    opened,
    renewal_counts,
    seed_invoice_history,
    seed_plan,
    seed_subscriptions,
    seed_users,
    seeding,
    warm_pool,
)
from tests.pg import TestServer

PROVIDER_BOUND_DUE = 2_000
PROVIDER_LATENCY_MS = 20
PROVIDER_CONCURRENCY = 32
DB_BOUND_TOTAL = 1_000_000
DB_BOUND_DUE = 10_000
DB_BOUND_TARGET_PER_SECOND = 2_000.0
# Implementation ticks per figure, each on its own copy of the data; the median is reported.
TICK_RUNS = 3
# What one renewal tick runs (every statement of renewals.sql): warm_pool runs each once on a
# connection before a warm tick.
RENEWAL_STATEMENTS = tuple(
    parse_statements(
        resources.files("nproxyd.store").joinpath("sql", "renewals.sql").read_text("utf-8")
    )
)

_FIND_DUE = """
SELECT s.id, s.user_id, s.current_period_start, s.activated_at, s.created_at,
       s.current_period_end, u.email, p.code, p.monthly_price_usd, p.billing_currency
FROM subscriptions AS s
JOIN users AS u ON u.id = s.user_id
JOIN subscription_plans AS p ON p.id = s.plan_id
WHERE s.status = 'active' AND s.renews_manually
  AND s.current_period_end > $1 AND s.current_period_end <= $2
ORDER BY s.current_period_end
"""
_FIND_CYCLE_INVOICE = """
SELECT * FROM payment_invoices
WHERE subscription_id = $1 AND created_at >= $2
ORDER BY created_at DESC
LIMIT 1
"""
_INSERT_INVOICE = """
INSERT INTO payment_invoices
    (user_id, subscription_id, provider, provider_invoice_id, status, currency,
     amount_crypto, amount_usd, payment_address, expires_at)
VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8, $9)
RETURNING *
"""


def bench_config(*, latency_ms: int, provider_concurrency: int | None = None) -> Config:
    """The default configuration with the simulated provider's latency (and concurrency)."""
    config = Config()
    billing = config.billing
    if provider_concurrency is not None:
        billing = msgspec.structs.replace(billing, provider_concurrency=provider_concurrency)
    simulated = msgspec.structs.replace(config.payment.simulated, latency_ms=latency_ms)
    payment = msgspec.structs.replace(config.payment, simulated=simulated)
    return msgspec.structs.replace(config, billing=billing, payment=payment)


def simulated_provider(config: Config) -> SimulatedPaymentProvider:
    return SimulatedPaymentProvider(config.payment.simulated, SystemClock().sleep, random.Random(7))


async def timed_tick(
    dsn: str, config: Config, now: datetime, *, warm: int = 0
) -> tuple[float, RenewalReport]:
    """One ``RenewalScheduler.tick`` as the daemon builds it; returns (seconds, report).

    With ``warm``, that many of the pool's connections are first brought to where they are
    in a daemon that ticked before (:func:`~tests.bench.common.warm_pool`), untimed.
    """
    clock = SystemClock()
    sender, receiver = anyio.create_memory_object_stream[OutboxReady](OUTBOX_READY_BUFFER)
    async with opened(dsn) as db:
        await warm_pool(db, RENEWAL_STATEMENTS, warm)
        with sender, receiver:
            ports = RenewalPorts(
                store=RenewalStore(db), provider=simulated_provider(config), outbox=Outbox(sender)
            )
            scheduler = RenewalScheduler(renewal_settings(config, "bench"), ports, clock)
            with Stopwatch() as watch:
                report = await scheduler.tick(now)
    return watch.seconds, report


async def original_worker_loop(dsn: str, config: Config, now: datetime) -> tuple[float, int]:
    """The original worker's renewal loop, in sequence; returns (seconds, invoices created)."""
    provider = simulated_provider(config)
    created = 0
    async with connected(dsn) as connection:
        with Stopwatch() as watch:
            subscriptions = await connection.fetch(_FIND_DUE, now, now + LEAD)
            for sub in subscriptions:
                cycle_start = (
                    sub["current_period_start"] or sub["activated_at"] or sub["created_at"]
                )
                if await connection.fetchrow(_FIND_CYCLE_INVOICE, sub["id"], cycle_start):
                    continue
                request = InvoiceRequest(
                    order_id=order_id(sub["id"], cycle_start),
                    subscription_id=sub["id"],
                    user_id=sub["user_id"],
                    plan_code=sub["code"],
                    amount_usd=sub["monthly_price_usd"],
                    currency=sub["billing_currency"],
                    description=f"nproxy {sub['code']} renewal",
                )
                answer = await provider.create_invoice(request, now)
                await connection.fetchrow(
                    _INSERT_INVOICE,
                    sub["user_id"],
                    sub["id"],
                    provider.name,
                    answer.provider_invoice_id,
                    answer.pay_currency,
                    answer.pay_amount,
                    sub["monthly_price_usd"],
                    answer.payment_address,
                    answer.expires_at,
                )
                created += 1
    return watch.seconds, created


async def provider_bound(server: TestServer) -> list[Figure]:
    """2,000 due subscriptions, provider latency 20 ms, provider concurrency 32."""
    bench = "renewal_provider_bound"
    config = bench_config(latency_ms=PROVIDER_LATENCY_MS, provider_concurrency=PROVIDER_CONCURRENCY)
    async with Databases(server, "renewal_p") as databases:
        dsn = await databases.clone()
        await seed_subscribers(dsn, count=PROVIDER_BOUND_DUE, due=PROVIDER_BOUND_DUE)
        reference_dsn = await databases.copy(dsn)
        seconds, complete = await median_tick(bench, databases, dsn, config, PROVIDER_BOUND_DUE)
        reference, created = await original_worker_loop(reference_dsn, config, NOW)
        note(bench, f"original loop {duration(reference)}: {created} invoices")
    complete = complete and created == PROVIDER_BOUND_DUE
    ideal = PROVIDER_BOUND_DUE * PROVIDER_LATENCY_MS / 1000 / config.billing.provider_concurrency
    speedup = reference / seconds
    return [
        Figure(
            name=bench,
            measured=duration(seconds),
            reference=duration(reference),
            ratio=speedup,
            target=">=20x",
            passed=complete and speedup >= 20,
        ),
        Figure(
            name=f"{bench}_vs_ideal",
            measured=duration(seconds),
            reference=f"{duration(ideal)}(ideal N*latency/concurrency)",
            ratio=seconds / ideal,
            target="<=1.5x",
            passed=complete and seconds / ideal <= 1.5,
        ),
    ]


async def db_bound(server: TestServer) -> list[Figure]:
    """10,000 due among 1,000,000 subscriptions, provider latency 0, default settings."""
    bench = "renewal_db_bound"
    config = bench_config(latency_ms=0)
    async with Databases(server, "renewal_d") as databases:
        dsn = await databases.clone()
        with Stopwatch() as watch:
            await seed_subscribers(dsn, count=DB_BOUND_TOTAL, due=DB_BOUND_DUE, history=True)
        note(
            bench,
            f"seeded {DB_BOUND_TOTAL} subscriptions and invoices in {duration(watch.seconds)}",
        )
        seconds, complete = await median_tick(bench, databases, dsn, config, DB_BOUND_DUE)
    rate = DB_BOUND_DUE / seconds
    return [
        Figure(
            name=bench,
            measured=f"{rate:.0f}/s",
            reference=f"{DB_BOUND_TARGET_PER_SECOND:.0f}/s(target)",
            ratio=rate / DB_BOUND_TARGET_PER_SECOND,
            target=f">={DB_BOUND_TARGET_PER_SECOND:.0f}/s",
            passed=complete and rate >= DB_BOUND_TARGET_PER_SECOND,
        )
    ]


async def median_tick(
    bench: str, databases: Databases, dsn: str, config: Config, due: int
) -> tuple[float, bool]:
    """Median seconds of one tick on each of ``TICK_RUNS`` identical copies of ``dsn``.

    Returns it with whether every run committed all ``due`` invoices, each with its mail.
    Each copy is dropped after its run, so its autovacuum never competes with the next one.
    """
    copies = [dsn, *[await databases.copy(dsn) for _ in range(TICK_RUNS - 1)]]
    runs: list[float] = []
    complete = True
    for copy in copies:
        seconds, report = await timed_tick(copy, config, NOW)
        invoices, mails = await renewal_counts(copy, NOW)
        await databases.drop(copy)
        note(
            bench,
            f"tick {duration(seconds)}: {report}; committed {invoices} invoices, {mails} mails",
        )
        runs.append(seconds)
        complete = complete and invoices == mails == due == report.created_count
    note(
        bench, f"ticks {', '.join(duration(run) for run in runs)}: median {duration(median(runs))}"
    )
    return median(runs), complete


async def seed_subscribers(dsn: str, *, count: int, due: int, history: bool = False) -> None:
    """``count`` subscribers, ``due`` of them inside the renewal window at ``NOW``."""
    async with seeding(dsn) as connection:
        await seed_plan(connection)
        await seed_users(connection, count)
        cycle_start = await seed_subscriptions(connection, count=count, due=due, now=NOW)
        if history:
            await seed_invoice_history(connection, count=count, now=NOW, cycle_start=cycle_start)
