"""What the benchmarks share: result lines, throwaway databases, set-based seeding.

Seeding is set-based (``INSERT ... SELECT generate_series``) with ids that sort in insertion
order, and with the per-row foreign-key triggers switched off (the rows are consistent by
construction), so a million rows take seconds. Every seeded database is vacuumed and analysed,
as autovacuum would have done long before a production table reached that size.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from nproxyd.store.database import Database, create_pool
from nproxyd.store.sql import STATEMENTS
from tests.pg import TEMPLATE, TestServer, with_database

# The renewal example's "now" (tests/renewal_checks.py); ticks run with an injected time.
NOW = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
LEAD = timedelta(hours=72)
PLAN_ID = "plan_1"
PRICE = Decimal("29")
CURRENCY = "USDT"
POOL_MAX_SIZE = 10

_names = itertools.count()


# -- result lines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One printed line: a figure of docs/design.md §6 against its reference and target."""

    name: str
    measured: str
    reference: str
    ratio: float
    target: str
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{self.name:<30}  measured={self.measured}  reference={self.reference}  "
            f"ratio={significant(self.ratio)}x  target{self.target}  {verdict}"
        )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def spread(values: list[float]) -> str:
    """``min..max`` of repeated durations, e.g. ``[8.1s..8.9s]``."""
    return f"[{duration(min(values))}..{duration(max(values))}]"


def significant(value: float, digits: int = 3) -> str:
    """``value`` with about ``digits`` significant digits and never an exponent."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def duration(seconds: float) -> str:
    """``1.31s`` or ``45.2ms``."""
    if seconds >= 1:
        return f"{significant(seconds)}s"
    return f"{significant(seconds * 1000)}ms"


def note(bench: str, message: str) -> None:
    """Progress goes to stderr, so stdout holds only the figure lines."""
    print(f"[{bench}] {message}", file=sys.stderr, flush=True)


STEAL_WARNING = 0.05  # of the machine's CPU time: more and the figures are not evidence
PROBE_ADDITIONS = 2_000_000


def python_probe() -> float:
    """Seconds this interpreter takes for a fixed loop of additions (the best of three).

    The host can slow this VM without stealing time from it (shared caches, clock speed):
    CPU steal then stays near 0 while the same Python runs up to twice as long. Interpreted
    code slows more than PostgreSQL or C, so a figure comparing the two moves with it.
    """
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for value in range(PROBE_ADDITIONS):
            total += value
        best = min(best, time.perf_counter() - started)
    return best


class Machine:
    """The host's share of this VM's CPU time (steal), the load average and the speed of the
    interpreter (:func:`python_probe`, before and after) over a benchmark.

    A hypervisor that takes CPU from the VM slows both sides of a comparison, but not evenly:
    a figure that needs both cores moves more than one that needs one. Each benchmark prints
    how much was stolen while it ran, and says so when its figures are not evidence.
    """

    def __init__(self) -> None:
        self.probe = python_probe()
        self.started = self._times()

    @staticmethod
    def _times() -> list[int]:
        with open("/proc/stat") as stat:  # "cpu user nice system idle iowait irq softirq steal"
            return [int(value) for value in stat.readline().split()[1:9]]

    def summary(self) -> str:
        now = self._times()
        spent = [after - before for before, after in zip(self.started, now, strict=True)]
        steal = spent[7] / max(1, sum(spent))
        load = os.getloadavg()[0]
        verdict = " (over 5 %: these figures are not evidence)" if steal > STEAL_WARNING else ""
        return (
            f"machine: CPU steal {steal:.1%}{verdict}, load average {load:.2f} at the end,"
            f" Python probe {duration(self.probe)} before, {duration(python_probe())} after"
        )


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.seconds``."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.started


# -- databases ------------------------------------------------------------------------------


class Databases:
    """Databases of one benchmark on the test server; every one is dropped on exit."""

    def __init__(self, server: TestServer, label: str) -> None:
        self.server = server
        self.label = label
        self.created: list[str] = []

    async def __aenter__(self) -> Databases:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for name in reversed(self.created):
            await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def clone(self) -> str:
        """A fresh database from the migrated template; returns its DSN."""
        return await self._create(TEMPLATE, strategy="")

    async def copy(self, source_dsn: str) -> str:
        """An identical copy of a database this object created (nobody may be connected)."""
        source = self._name(source_dsn)
        # FILE_COPY copies the files after a checkpoint: much faster than the default
        # WAL_LOG strategy for a database of several hundred megabytes.
        return await self._create(source, strategy=" STRATEGY FILE_COPY")

    async def drop(self, dsn: str) -> None:
        name = self._name(dsn)
        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.created.remove(name)

    def dsn(self, name: str) -> str:
        return with_database(self.server.admin_dsn, name)

    def _name(self, dsn: str) -> str:
        """The name of a database this object created, from its DSN."""
        by_dsn = {self.dsn(name): name for name in self.created}
        return by_dsn[dsn]

    async def _create(self, template: str, *, strategy: str) -> str:
        name = f"nproxyd_bench_{self.label}_{os.getpid()}_{next(_names)}"
        await self._admin(f"CREATE DATABASE {name} TEMPLATE {template}{strategy}")
        self.created.append(name)
        return self.dsn(name)

    async def _admin(self, statement: str) -> None:
        admin = await asyncpg.connect(self.server.admin_dsn)
        try:
            await admin.execute(statement)
        finally:
            await admin.close()


@asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[Database]:
    """The daemon's own pool and :class:`Database` wrapper, warmed by one query."""
    db = Database(await create_pool(dsn, max_size=POOL_MAX_SIZE, timeout_seconds=10))
    try:
        await db.fetchval("ping")
        yield db
    finally:
        await db.close()


async def warm_pool(db: Database, statements: Sequence[str], connections: int) -> None:
    """Bring ``connections`` of the pool to where a running daemon's are between ticks: open,
    each having run the named ``statements`` once (prepared, the catalog entries of their
    tables and indexes cached in the backend).

    Every parameter is NULL, so no row matches and nothing is written.
    """
    held = [await db.pool.acquire() for _ in range(connections)]
    try:
        for connection in held:
            for name in statements:
                statement = STATEMENTS[name]
                await connection.fetch(statement.text, *([None] * statement.count))
    finally:
        for connection in held:
            await db.pool.release(connection)


@asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()


@asynccontextmanager
async def seeding(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection for set-based seeding; vacuums and analyses the database at the end."""
    async with connected(dsn) as connection:
        # The rows are consistent by construction: skip the per-row foreign-key checks
        # (only a superuser may; with NPROXYD_TEST_DSN seeding is slower, the rows the same).
        with suppress(asyncpg.InsufficientPrivilegeError):
            await connection.execute("SET session_replication_role = replica")
        yield connection
        await connection.execute("RESET session_replication_role")
        await connection.execute("VACUUM ANALYZE")


async def checkpoint(connection: asyncpg.Connection) -> None:
    """Start a timed run with no dirty buffers left over from seeding."""
    with suppress(asyncpg.InsufficientPrivilegeError):
        await connection.execute("CHECKPOINT")


# -- seeding --------------------------------------------------------------------------------


def padded(prefix: str, expression: str = "g") -> str:
    """SQL for ids that sort in insertion order: ``'u' || lpad(g::text, 7, '0')``."""
    return f"'{prefix}' || lpad(({expression})::text, 7, '0')"


async def seed_plan(connection: asyncpg.Connection) -> None:
    await connection.execute(
        "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
        " monthly_price_usd, billing_currency) VALUES ($1, 'monthly', 'Monthly', 1000, $2, $3)",
        PLAN_ID,
        PRICE,
        CURRENCY,
    )


async def seed_users(connection: asyncpg.Connection, count: int) -> None:
    """Users ``u0000001``... with their e-mail addresses."""
    await connection.execute(
        f"INSERT INTO users (id, email, created_at)"
        f" SELECT {padded('u')}, {padded('u')} || '@example.com', $2"
        f" FROM generate_series(1, $1) AS g",
        count,
        NOW - timedelta(days=400),
    )


async def seed_subscriptions(
    connection: asyncpg.Connection, *, count: int, due: int, now: datetime
) -> datetime:
    """One active manual-renewal subscription per user ``u<n>``, id ``s<n>``.

    The first ``due`` end inside the renewal window at ``now`` (spread over the 72 hours);
    the others end after it (spread over the following weeks). Returns the cycle start.
    """
    cycle_start = now - timedelta(days=27)
    await connection.execute(
        f"INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
        f" activated_at, current_period_start, current_period_end, created_at, updated_at)"
        f" SELECT {padded('s')}, {padded('u')}, $3, 'active', true, $4, $4,"
        f"  CASE WHEN g <= $2"
        f"   THEN $5::timestamptz + (g * $6::float8 / greatest($2, 1)) * interval '1 second'"
        f"   ELSE $5::timestamptz + ($6::float8 + 3600 + (g - $2) * 2) * interval '1 second'"
        f"  END, $4, $4"
        f" FROM generate_series(1, $1) AS g",
        count,
        due,
        PLAN_ID,
        cycle_start,
        now,
        LEAD.total_seconds(),
    )
    return cycle_start


async def seed_invoice_history(
    connection: asyncpg.Connection, *, count: int, now: datetime, cycle_start: datetime
) -> None:
    """One invoice per subscription ``s<n>``, created before its current cycle; none is due.

    Most are paid; some expired or canceled; some still pending with an expiry in the future
    or none at all (docs/design.md §2: those never expire).
    """
    await connection.execute(
        f"INSERT INTO payment_invoices (id, user_id, subscription_id, provider,"
        f" provider_invoice_id, status, currency, amount_crypto, amount_usd, payment_address,"
        f" expires_at, paid_at, created_at, updated_at)"
        f" SELECT {padded('i')}, {padded('u')}, {padded('s')}, 'nowpayments', 'np_' || g,"
        f"  k.status, 'USDT', 29, 29, 'addr_' || g,"
        f"  CASE WHEN g % 20 = 19 THEN NULL"
        f"       WHEN g % 20 = 18 THEN $2::timestamptz + interval '1 day' + g * interval '1 second'"
        f"       ELSE $3::timestamptz END,"
        f"  CASE WHEN k.status = 'paid' THEN $3::timestamptz END, $3, $3"
        f" FROM generate_series(1, $1) AS g,"
        f" LATERAL (SELECT CASE WHEN g % 20 < 14 THEN 'paid' WHEN g % 20 < 17 THEN 'expired'"
        f"   WHEN g % 20 = 17 THEN 'canceled' ELSE 'pending' END AS status) AS k",
        count,
        now,
        cycle_start - timedelta(days=2),
    )


async def renewal_counts(dsn: str, since: datetime) -> tuple[int, int]:
    """Invoices created at or after ``since``, and renewal mails naming an invoice."""
    async with connected(dsn) as connection:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM payment_invoices WHERE created_at >= $1) AS invoices,"
            " (SELECT count(*) FROM mail_outbox AS m JOIN payment_invoices AS i"
            "   ON m.dedupe_key = 'renewal-invoice:' || i.id) AS mails",
            since,
        )
    assert row is not None
    return int(row["invoices"]), int(row["mails"])
