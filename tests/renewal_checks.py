"""Renewal test data and the invariants every renewal test checks (docs/design.md §3, 1 and 2).

Invoices a test inserts itself (manual invoices of the web API) get ids starting with
``seed-``; every other invoice was created by the renewal scheduler.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import asyncpg

from nproxyd.core.channels import Outbox
from nproxyd.core.messages import OutboxReady

# The worked example of the renewal issue.
PERIOD_START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PERIOD_END = datetime(2026, 3, 12, 11, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
SEEDED_PREFIX = "seed-"

Pool = asyncpg.Connection | asyncpg.Pool


async def seed_due(
    connection: Pool,
    count: int,
    *,
    prefix: str = "sub",
    plan_id: str = "plan_1",
    period_start: datetime = PERIOD_START,
    period_end: datetime = PERIOD_END,
) -> list[str]:
    """Insert ``count`` due subscriptions (and their users) set-based; returns their ids."""
    await connection.execute(
        "INSERT INTO users (id, email)"
        " SELECT 'user_' || $1 || g, 'user_' || $1 || g || '@example.com'"
        " FROM generate_series(1, $2) AS g",
        prefix,
        count,
    )
    await connection.execute(
        "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
        " activated_at, current_period_start, current_period_end)"
        " SELECT $1 || g, 'user_' || $1 || g, $3, 'active', true, $4, $4, $5"
        " FROM generate_series(1, $2) AS g",
        prefix,
        count,
        plan_id,
        period_start,
        period_end,
    )
    return [f"{prefix}{n}" for n in range(1, count + 1)]


async def automatic_invoices(connection: Pool) -> list[asyncpg.Record]:
    """Invoices the scheduler created (not seeded by the test), oldest first."""
    return await connection.fetch(
        "SELECT * FROM payment_invoices WHERE id NOT LIKE $1 || '%' ORDER BY created_at, id",
        SEEDED_PREFIX,
    )


async def assert_renewal_invariants(connection: Pool) -> None:
    """Invariant 2 (one mail per invoice and no mail without one) and invariant 1."""
    rows = await connection.fetch(
        "SELECT i.id, (SELECT count(*) FROM mail_outbox AS m"
        "              WHERE m.dedupe_key = 'renewal-invoice:' || i.id) AS mails"
        " FROM payment_invoices AS i WHERE i.id NOT LIKE $1 || '%'",
        SEEDED_PREFIX,
    )
    without_one_mail = {row["id"]: row["mails"] for row in rows if row["mails"] != 1}
    assert without_one_mail == {}, "invoices without exactly one renewal mail"
    orphans = await connection.fetch(
        "SELECT m.id, m.dedupe_key FROM mail_outbox AS m"
        " WHERE m.dedupe_key LIKE 'renewal-invoice:%' AND NOT EXISTS ("
        "   SELECT 1 FROM payment_invoices AS i WHERE m.dedupe_key = 'renewal-invoice:' || i.id)"
    )
    assert [dict(row) for row in orphans] == [], "renewal mail without its invoice"
    doubles = await connection.fetch(
        "SELECT i.subscription_id, count(*) AS n FROM payment_invoices AS i"
        " JOIN subscriptions AS s ON s.id = i.subscription_id"
        " WHERE i.id NOT LIKE $1 || '%'"
        "   AND i.created_at >= coalesce(s.current_period_start, s.activated_at, s.created_at)"
        " GROUP BY i.subscription_id HAVING count(*) > 1",
        SEEDED_PREFIX,
    )
    assert [dict(row) for row in doubles] == [], "two automatic invoices in one cycle"
    unlinked = await connection.fetch(
        "SELECT i.id FROM payment_invoices AS i WHERE i.id NOT LIKE $1 || '%'"
        " AND NOT EXISTS (SELECT 1 FROM nproxyd_renewal_claims AS c"
        "                 WHERE c.invoice_id = i.id AND c.subscription_id = i.subscription_id"
        "                   AND c.state = 'done')",
        SEEDED_PREFIX,
    )
    assert [row["id"] for row in unlinked] == [], "automatic invoice without its done claim"


class Channel:
    """The scheduler's outbox channel and the receiving end the mail sender would hold."""

    def __init__(self) -> None:
        sender, self.receiver = anyio.create_memory_object_stream[OutboxReady](256)
        self.outbox = Outbox(sender)

    def received(self) -> list[OutboxReady]:
        messages = []
        while True:
            try:
                messages.append(self.receiver.receive_nowait())
            except anyio.WouldBlock:
                return messages
