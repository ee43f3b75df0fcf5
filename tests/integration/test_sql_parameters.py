"""Every statement's parameters agree with PostgreSQL and with the store method that calls it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nproxyd.core.payments import CheckResult, RecordContext
from nproxyd.store.database import Database
from nproxyd.store.payments import PaymentStore
from nproxyd.store.sql import STATEMENTS
from nproxyd.store.stores import KeyStore, OutboxStore, RenewalStore

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


class RecordingDatabase(Database):
    """The real database, noting the keywords each statement was called with."""

    def __init__(self, db: Database) -> None:
        super().__init__(db.pool)
        self.keywords: dict[str, set[str]] = {}

    async def fetch(self, name: str, /, *args: Any, **params: Any) -> Any:
        self.keywords[name] = set(params)
        return await super().fetch(name, *args, **params)

    async def fetchval(self, name: str, /, *args: Any, **params: Any) -> Any:
        self.keywords[name] = set(params)
        return await super().fetchval(name, *args, **params)

    async def execute(self, name: str, /, *args: Any, **params: Any) -> str:
        self.keywords[name] = set(params)
        return await super().execute(name, *args, **params)


StoreCall = Callable[[Database], Awaitable[object]]

# One call of the store method behind each statement that takes its parameters by name. The
# binding refuses a missing or an unknown name, so a call that runs passes exactly the names.
STORE_CALLS: dict[str, StoreCall] = {
    "record_key_failures": lambda db: KeyStore(db).record_failures(
        ["k"], ["boom"], NOW, cooldown_minutes=5, failures_before_manual_review=3
    ),
    "renewal_candidates": lambda db: RenewalStore(db).candidates(NOW, LATER, (NOW, ""), 10),
    "claim_renewal_slots": lambda db: RenewalStore(db).claim(
        [], holder="h", token="t", now=NOW, lease_until=LATER
    ),
    "commit_renewal_invoices": lambda db: RenewalStore(db).commit([], provider="p", now=NOW),
    "release_renewal_claims": lambda db: RenewalStore(db).release([], NOW),
    "record_mail_outcomes": lambda db: OutboxStore(db).record([], NOW, "h"),
    "enqueue_mail": lambda db: OutboxStore(db).enqueue(
        to_address="a@example.com",
        subject="s",
        body="b",
        message_id="<m@example.com>",
        dedupe_key=None,
        now=NOW,
    ),
    "record_payment_results": lambda db: PaymentStore(db).record(
        [CheckResult(invoice_id="unknown", outcome="ok")],
        RecordContext(now=NOW, source="poll", operator_email="ops@example.com"),
    ),
}


async def test_every_statement_takes_the_parameters_it_declares(db: Database) -> None:
    """PostgreSQL prepares each statement with exactly as many parameters as its block names."""
    assert STATEMENTS
    async with db.pool.acquire() as connection:
        for name, statement in STATEMENTS.items():
            prepared = await connection.prepare(statement.text)
            assert len(prepared.get_parameters()) == statement.count, name


def test_every_named_statement_has_a_store_call_here() -> None:
    """A statement that binds by name is listed below, so its caller is checked against it."""
    named = {name for name, statement in STATEMENTS.items() if statement.names}
    assert named == set(STORE_CALLS)


@pytest.mark.parametrize("name", sorted(STORE_CALLS))
async def test_the_store_method_passes_exactly_the_statement_names(db: Database, name: str) -> None:
    """The store method behind a named statement binds every name and no other, and it runs."""
    recording = RecordingDatabase(db)
    await STORE_CALLS[name](recording)
    assert recording.keywords[name] == set(STATEMENTS[name].names)
