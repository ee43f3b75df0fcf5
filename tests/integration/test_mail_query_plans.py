"""The mail sender's batch statements keep their plans at batch 1000, tiny or 1M-row outbox.

``claim_due_mail`` joins its locked batch, ``record_mail_outcomes`` its ``unnest`` of outcomes,
to ``mail_outbox``. Whatever the size of the outbox, both must reach it through the primary key
(a probe per row of the batch): never a hash of the whole table (the claim's plan flipped
to one on a small outbox), never a read of ``mail_outbox`` once per row of the batch (the
quadratic plan the planner chose when it guessed ``leased_by = $holder`` matches ~1 row).
Each is checked with custom and generic plans, the statements executed for real (EXPLAIN
ANALYZE inside a transaction rolled back).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nproxyd.store.database import Database
from tests.plans import PLAN_MODES, Held, Prepare, explain_analyze
from tests.plans import reads as table_reads

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
BATCH = 1000
HOLDER = "instance-a"


async def seed(db: Database, rows: int, due: int = BATCH) -> list[str]:
    """``rows`` mails (set-based), the first ``due`` due; the rest sent. Analyzed."""
    await db.pool.execute(
        "INSERT INTO mail_outbox (id, status, to_address, subject, body, message_id,"
        " next_attempt_at, sent_at)"
        " SELECT 'm' || lpad(g::text, 8, '0'),"
        "  CASE WHEN g <= $2 THEN 'pending' ELSE 'sent' END, 'a@example.com', 's',"
        "  repeat('b', 600), '<' || g || '@example.com>', $3::timestamptz,"
        "  CASE WHEN g > $2 THEN $3::timestamptz END"
        " FROM generate_series(1, $1::int) AS g",
        rows,
        due,
        NOW - timedelta(minutes=1),
    )
    await db.pool.execute("ANALYZE mail_outbox")
    return [f"m{number:08d}" for number in range(1, BATCH + 1)]


def held(ids: list[str]) -> Prepare:
    """Lease ``ids`` to HOLDER, as the claim left them (the statistics are not told)."""

    async def lease(connection: Held) -> None:
        await connection.execute(
            "UPDATE mail_outbox SET leased_by = $1, lease_until = $2 WHERE id = ANY($3::text[])",
            HOLDER,
            NOW + timedelta(minutes=5),
            ids,
        )

    return lease


async def plans(db: Database, ids: list[str], mode: str) -> dict[str, Any]:
    claim = await explain_analyze(
        db, "claim_due_mail", mode, NOW, NOW + timedelta(minutes=5), HOLDER, BATCH
    )
    record = await explain_analyze(
        db,
        "record_mail_outcomes",
        mode,
        before=held(ids),
        ids=ids,
        statuses=["sent"] * BATCH,
        errors=[None] * BATCH,
        next_attempt_at=[NOW] * BATCH,
        counts_attempt=[True] * BATCH,
        now=NOW,
        holder=HOLDER,
    )
    return {"claim_due_mail": claim, "record_mail_outcomes": record}


class TestBatchPlans:
    @pytest.mark.parametrize("mode", PLAN_MODES)
    @pytest.mark.parametrize(
        ("rows", "due"),
        [(BATCH, BATCH), (10 * BATCH, 10 * BATCH), (1_000_000, BATCH)],
        ids=["tiny", "small", "1M"],
    )
    async def test_batch_reaches_the_outbox_through_its_primary_key(
        self, db: Database, mode: str, rows: int, due: int
    ) -> None:
        """The batch reaches mail_outbox by its primary key; nothing reads the table per row."""
        ids = await seed(db, rows, due=due)

        for name, plan in (await plans(db, ids, mode)).items():
            reads = table_reads(plan, "mail_outbox")
            updated = [read for read in reads if read[0] == "m"]
            assert [read[1:3] for read in updated] == [("Index Scan", "mail_outbox_pkey")], (
                name,
                reads,
            )
            repeated = [read for read in reads if read[3] > 1 and read[2] != "mail_outbox_pkey"]
            assert repeated == [], (name, reads)
            if rows > due:  # only finding the due rows may read more, and only when all are due
                assert all(kind != "Seq Scan" for _, kind, _, _ in reads), (name, reads)
