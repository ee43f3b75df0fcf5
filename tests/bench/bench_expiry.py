"""Expiry benchmark (DESIGN.md §6): batched expiry against one set-based UPDATE.

1,000,000 due pending invoices (and 10,000 pending ones not yet due) with random uuid ids, as
the web API creates them, and expiry times that grow with insertion order. One copy is expired
by ``InvoiceExpirer.tick`` (batches of 10,000), an identical copy by one UPDATE. Meanwhile a
probe updates one random invoice every 50 ms, on its own connection, and records how long each
update waited: what a web request that touches an invoice would feel.
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

from nproxyd.actors.invoice_expirer import InvoiceExpirer
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
    note,
    opened,
    padded,
    seed_users,
    seeding,
)
from tests.pg import TestServer

DUE = 1_000_000
NOT_DUE = 10_000
USERS = 10_000
BATCH_SIZE = 10_000
PROBE_INTERVAL_SECONDS = 0.05
SPEED_TARGET = 0.6
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


async def seed_invoices(dsn: str, now: datetime) -> None:
    """``DUE`` pending invoices expired over the last 11.6 days, then ``NOT_DUE`` in the future."""
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
            f" LATERAL (SELECT CASE WHEN g <= $1"
            f"   THEN $4::timestamptz - ($1 + 1 - g) * interval '1 second'"
            f"   ELSE $4::timestamptz + (g - $1) * interval '1 minute' END AS expires_at) AS t",
            DUE,
            NOT_DUE,
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
        expirer = InvoiceExpirer(InvoiceStore(db), interval_seconds=60, batch_size=BATCH_SIZE)
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


async def run(server: TestServer) -> list[Figure]:
    bench = "expiry"
    now = NOW
    async with Databases(server, "expiry") as databases:
        dsn = await databases.clone()
        with Stopwatch() as watch:
            await seed_invoices(dsn, now)
        note(bench, f"seeded {DUE + NOT_DUE} invoices in {duration(watch.seconds)}")
        reference_dsn = await databases.copy(dsn)
        seconds, probe, report = await batched(dsn, now)
        left = await still_due(dsn, now)
        note(bench, f"tick {duration(seconds)}: {report}; {left} still due; {_waits(probe)}")
        # Its autovacuum must not compete with the reference run.
        await databases.drop(dsn)
        reference, reference_probe, tag = await single_update(reference_dsn, now)
        note(bench, f"single UPDATE {duration(reference)}: {tag}; {_waits(reference_probe)}")
    complete = report.expired_count + left >= DUE and left <= 1
    speed = reference / seconds
    return [
        Figure(
            name=bench,
            measured=duration(seconds),
            reference=f"{duration(reference)}(one UPDATE)",
            ratio=speed,
            target=f">={SPEED_TARGET}x",
            passed=complete and speed >= SPEED_TARGET,
        ),
        Figure(
            name=f"{bench}_row_wait",
            measured=duration(probe.max_wait),
            reference=f"{duration(reference_probe.max_wait)}(max wait during one UPDATE)",
            ratio=probe.max_wait / WAIT_TARGET_SECONDS,
            target=f"<{WAIT_TARGET_SECONDS:g}s",
            passed=probe.max_wait < WAIT_TARGET_SECONDS,
        ),
    ]


def _waits(probe: RowProbe) -> str:
    return f"probe: {len(probe.waits)} updates, max wait {duration(probe.max_wait)}"
