"""Expiry benchmarks (docs/design.md §6): batched expiry against one set-based UPDATE.

1,000,000 due pending invoices with random uuid ids, as the web API creates them, in two
layouts: expiry times that grow with insertion order (``expiry_correlated``, plus 10,000 not
yet due), and due rows sharing one expiry time interleaved with as many not yet due
(``expiry_interleaved``). Identical copies are expired by ``InvoiceExpirer.tick`` (batches of
10,000) and by one UPDATE, A/B then B/A, three times; the figure is the ratio of the medians.
Meanwhile a probe updates one random invoice every 50 ms, on its own connection, and records
how long each update waited: what a web request that touches an invoice would feel.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import anyio
import asyncpg

from nproxyd.actors.invoice_expirer import ExpirerPorts, ExpirerSettings, InvoiceExpirer
from nproxyd.core.clock import SystemClock
from nproxyd.core.messages import ExpirerReport
from nproxyd.store.stores import InvoiceStore
from tests.bench.common import (
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
    seed_users,
    seeding,
    spread,
)
from tests.pg import TestServer

DUE = 1_000_000
NOT_DUE = 10_000
USERS = 10_000
BATCH_SIZE = 10_000
PROBE_INTERVAL_SECONDS = 0.05
SPEED_TARGET = 0.9
WAIT_TARGET_SECONDS = 1.0

SINGLE_UPDATE = (
    "UPDATE payment_invoices SET status = 'expired', updated_at = $1"
    " WHERE status = 'pending' AND expires_at <= $1"
)
PROBE_UPDATE = "UPDATE payment_invoices SET updated_at = now() WHERE id = $1"


def invoice_id(number: int) -> str:
    """The id of seeded invoice ``number``: a uuid, as ``md5(g::text)::uuid::text`` makes it."""
    digest = hashlib.md5(str(number).encode(), usedforsecurity=False).hexdigest()
    return str(uuid.UUID(digest))


async def seed_invoices(dsn: str, now: datetime, *, interleaved: bool) -> None:
    """``DUE`` due pending invoices and ``NOT_DUE`` not yet due (``not_due`` for the layout).

    Correlated: due rows expired over the last 11.6 days in insertion order, then the not-due
    ones. Interleaved: due and not-due rows alternate on every page, all due rows with the same
    expiry time (a batch of invoices created together).
    """
    not_due = DUE if interleaved else NOT_DUE
    due_row = "g % 2 = 0" if interleaved else "g <= $1"
    due_at = (
        "$4::timestamptz - interval '1 hour'"
        if interleaved
        else ("$4::timestamptz - ($1 + 1 - g) * interval '1 second'")
    )
    async with seeding(dsn) as connection:
        await seed_users(connection, USERS)
        await connection.execute(
            f"INSERT INTO payment_invoices (id, user_id, provider, provider_invoice_id, status,"
            f" currency, amount_crypto, amount_usd, payment_address, expires_at, created_at,"
            f" updated_at)"
            f" SELECT md5(g::text)::uuid::text, {padded('u', '1 + g % $3::int')}, 'nowpayments',"
            f"  'np_' || g, 'pending', 'USDT', 29, 29, 'addr_' || g, t.expires_at,"
            f"  t.expires_at - interval '1 day', t.expires_at - interval '1 day'"
            f" FROM generate_series(1, $1::int + $2::int) AS g,"
            f" LATERAL (SELECT CASE WHEN {due_row} THEN {due_at}"
            f"   ELSE $4::timestamptz + g * interval '1 second' END AS expires_at) AS t",
            DUE,
            not_due,
            USERS,
            now,
        )


class RowProbe:
    """Updates one random invoice every 50 ms on its own connection; keeps every wait."""

    def __init__(self, dsn: str, total: int) -> None:
        self.dsn = dsn
        self.total = total
        self.rng = random.Random(11)
        self.waits: list[float] = []
        self.ready = anyio.Event()

    async def run(self, stop: anyio.Event) -> None:
        async with connected(self.dsn) as connection:
            await connection.execute(PROBE_UPDATE, invoice_id(self.total + 1))  # prepares it
            self.ready.set()
            while not stop.is_set():
                await self._probe(connection, stop)

    async def _probe(self, connection: asyncpg.Connection, stop: anyio.Event) -> None:
        started = time.perf_counter()
        # Not cancelled when the work ends: a wait in progress is the one that matters.
        await connection.execute(PROBE_UPDATE, invoice_id(self.rng.randint(1, self.total)))
        self.waits.append(time.perf_counter() - started)
        with anyio.move_on_after(started + PROBE_INTERVAL_SECONDS - time.perf_counter()):
            await stop.wait()

    @property
    def max_wait(self) -> float:
        return max(self.waits, default=0.0)


async def probed(dsn: str, work: Callable[[], Awaitable[object]]) -> tuple[float, RowProbe]:
    """Run ``work`` while a :class:`RowProbe` runs; returns (seconds of work, probe)."""
    probe = RowProbe(dsn, DUE + NOT_DUE)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(probe.run, stop, name="row-probe")
        await probe.ready.wait()
        with Stopwatch() as watch:
            await work()
        stop.set()
    return watch.seconds, probe


async def batched(dsn: str, now: datetime) -> tuple[float, RowProbe, ExpirerReport]:
    async with opened(dsn) as db:
        async with connected(dsn) as connection:
            await checkpoint(connection)
        expirer = InvoiceExpirer(
            ExpirerSettings(interval_seconds=60, batch_size=BATCH_SIZE),
            ExpirerPorts(store=InvoiceStore(db)),
            SystemClock(),
        )
        reports: list[ExpirerReport] = []

        async def work() -> None:
            reports.append(await expirer.tick(now))

        seconds, probe = await probed(dsn, work)
    return seconds, probe, reports[0]


async def single_update(dsn: str, now: datetime) -> tuple[float, RowProbe, str]:
    async with connected(dsn) as connection:
        await checkpoint(connection)
        tags: list[str] = []

        async def work() -> None:
            tags.append(await connection.execute(SINGLE_UPDATE, now))

        seconds, probe = await probed(dsn, work)
    return seconds, probe, tags[0]


async def still_due(dsn: str, now: datetime) -> int:
    async with connected(dsn) as connection:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM payment_invoices WHERE status = 'pending' AND expires_at <= $1",
            now,
        )
    return count


REPETITIONS = 3


async def correlated(server: TestServer) -> list[Figure]:
    """Expiry times follow insertion order: the due rows fill the first pages."""
    return await _compare(server, "expiry_correlated", interleaved=False)


async def interleaved(server: TestServer) -> list[Figure]:
    """Due and not-due rows alternate on every page; the due ones share one expiry time."""
    return await _compare(server, "expiry_interleaved", interleaved=True)


async def _compare(server: TestServer, bench: str, *, interleaved: bool) -> list[Figure]:
    """Batched ticks and one UPDATE on identical copies, interleaved, ``REPETITIONS`` times."""
    now = NOW
    ticks: list[float] = []
    updates: list[float] = []
    waits: list[float] = []
    reference_waits: list[float] = []
    complete = True
    async with Databases(server, "expiry") as databases:
        base = await databases.clone()
        with Stopwatch() as watch:
            await seed_invoices(base, now, interleaved=interleaved)
        note(bench, f"seeded the base copy in {duration(watch.seconds)}")
        for repetition in range(REPETITIONS):
            tick_first = repetition % 2 == 0  # A/B, then B/A: neither always runs on a warm cache
            for run_tick in (tick_first, not tick_first):
                dsn = await databases.copy(base)
                if run_tick:
                    seconds, probe, report = await batched(dsn, now)
                    left = await still_due(dsn, now)
                    complete = complete and report.expired_count + left >= DUE and left <= 1
                    ticks.append(seconds)
                    waits.append(probe.max_wait)
                    note(bench, f"tick {duration(seconds)}: {report}; {left} still due")
                else:
                    seconds, probe, tag = await single_update(dsn, now)
                    updates.append(seconds)
                    reference_waits.append(probe.max_wait)
                    note(bench, f"single UPDATE {duration(seconds)}: {tag}")
                await databases.drop(dsn)
    speed = median(updates) / median(ticks)
    return [
        Figure(
            name=bench,
            measured=f"{duration(median(ticks))}{spread(ticks)}",
            reference=f"{duration(median(updates))}{spread(updates)}(one UPDATE)",
            ratio=speed,
            target=f">={SPEED_TARGET}x",
            passed=complete and speed >= SPEED_TARGET,
        ),
        Figure(
            name=f"{bench}_row_wait",
            measured=duration(max(waits)),
            reference=f"{duration(max(reference_waits))}(max wait during one UPDATE)",
            ratio=max(waits) / WAIT_TARGET_SECONDS,
            target=f"<{WAIT_TARGET_SECONDS:g}s",
            passed=max(waits) < WAIT_TARGET_SECONDS,
        ),
    ]


def _waits(probe: RowProbe) -> str:
    return f"probe: {len(probe.waits)} updates, max wait {duration(probe.max_wait)}"
