"""The key-pool recoverer and key failure accounting against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from nproxyd.actors.key_pool_recoverer import KeyPoolPorts, KeyPoolRecoverer, KeyPoolSettings
from nproxyd.adapters.balance_simulated import SimulatedBalanceProbe
from nproxyd.core.clock import SystemClock
from nproxyd.store.database import Database
from nproxyd.store.stores import KeyStore
from tests import seed

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
SETTINGS = KeyPoolSettings(
    interval_seconds=60,
    cooldown_minutes=10,
    failures_before_manual_review=3,
    balance_poll_seconds=60,
    balance_probe_concurrency=4,
)


async def key_rows(db: Database) -> dict[str, dict[str, object]]:
    rows = await db.pool.fetch("SELECT * FROM provider_keys")
    return {row["id"]: dict(row) for row in rows}


def recoverer(db: Database, probe: SimulatedBalanceProbe | None = None) -> KeyPoolRecoverer:
    ports = KeyPoolPorts(store=KeyStore(db), probe=probe or SimulatedBalanceProbe())
    return KeyPoolRecoverer(SETTINGS, ports, SystemClock())


class TestRecovery:
    async def test_elapsed_cooldown_returns_to_active_keeping_failures(self, db: Database) -> None:
        """A cooldown key whose cooldown elapsed is active again with its failure count kept."""
        await seed.key(
            db.pool, "due", status="cooldown", failures=2, cooldown_until=NOW - timedelta(seconds=1)
        )
        await seed.key(
            db.pool,
            "later",
            status="cooldown",
            failures=1,
            cooldown_until=NOW + timedelta(minutes=1),
        )

        report = await recoverer(db).tick(NOW)

        rows = await key_rows(db)
        assert report.recovered_count == 1
        assert (rows["due"]["status"], rows["due"]["consecutive_failures"]) == ("active", 2)
        assert rows["due"]["cooldown_until"] is None
        assert rows["later"]["status"] == "cooldown"

    async def test_manual_review_and_disabled_are_never_touched(self, db: Database) -> None:
        """Keys in manual_review or disabled keep their status and are not probed."""
        await seed.key(db.pool, "review", status="manual_review", failures=3)
        await seed.key(db.pool, "off", status="disabled")
        probe = SimulatedBalanceProbe(errors={"review": "x", "off": "x"})

        report = await recoverer(db, probe).tick(NOW)

        rows = await key_rows(db)
        assert report.balance_checked_count == 0
        assert rows["review"]["status"] == "manual_review"
        assert rows["off"]["status"] == "disabled"
        assert rows["review"]["balance_checked_at"] is None


class TestFailureAccounting:
    async def test_failures_go_to_cooldown_then_manual_review_at_threshold(
        self, db: Database
    ) -> None:
        """Each failure counts; below the threshold cooldown, at the threshold manual_review."""
        await seed.key(db.pool, "k")
        store = KeyStore(db)
        seen = []
        for _ in range(3):
            result = await store.record_failures(
                ["k"], ["boom"], NOW, cooldown_minutes=10, failures_before_manual_review=3
            )
            seen.append(result[0].status)
        rows = await key_rows(db)
        assert seen == ["cooldown", "cooldown", "manual_review"]
        assert rows["k"]["consecutive_failures"] == 3
        assert rows["k"]["cooldown_until"] is None
        assert rows["k"]["last_error"] == "boom"

    async def test_cooldown_lasts_the_configured_minutes(self, db: Database) -> None:
        """A failure puts the key in cooldown until now + cooldown_minutes."""
        await seed.key(db.pool, "k")
        await KeyStore(db).record_failures(
            ["k"], ["e"], NOW, cooldown_minutes=10, failures_before_manual_review=3
        )
        assert (await key_rows(db))["k"]["cooldown_until"] == NOW + timedelta(minutes=10)


class TestBalancePolling:
    async def test_balances_are_stored_and_failures_counted(self, db: Database) -> None:
        """Good balances are recorded; an error or a zero balance counts as a key failure."""
        for name in ("good", "broken", "empty"):
            await seed.key(db.pool, name, failures=1 if name == "good" else 0)
        probe = SimulatedBalanceProbe(
            balances={"good": Decimal("12.5"), "empty": Decimal("0")},
            errors={"broken": "HTTP 503 from balance endpoint"},
        )

        report = await recoverer(db, probe).tick(NOW)

        rows = await key_rows(db)
        assert (report.balance_checked_count, report.balance_failed_count) == (3, 2)
        assert rows["good"]["balance"] == Decimal("12.5")
        assert rows["good"]["balance_checked_at"] == NOW
        assert rows["good"]["consecutive_failures"] == 1  # a good probe never resets failures
        assert rows["broken"]["status"] == "cooldown"
        assert "503" in str(rows["broken"]["last_error"])
        assert rows["empty"]["status"] == "cooldown"
        assert rows["empty"]["balance"] == Decimal("0")

    async def test_balances_are_polled_only_when_due(self, db: Database) -> None:
        """A key checked less than balance_poll_seconds ago is not probed again."""
        await seed.key(db.pool, "k")
        first = await recoverer(db).tick(NOW)
        soon = await recoverer(db).tick(NOW + timedelta(seconds=30))
        later = await recoverer(db).tick(NOW + timedelta(seconds=61))
        assert [
            first.balance_checked_count,
            soon.balance_checked_count,
            later.balance_checked_count,
        ] == [1, 0, 1]
