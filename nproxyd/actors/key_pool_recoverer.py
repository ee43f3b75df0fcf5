"""Key-pool recoverer: cooldown keys back to active, balance polling, parking failing keys."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import anyio
import msgspec
import structlog

from nproxyd.core.clock import Clock
from nproxyd.core.errors import BalanceProbeError
from nproxyd.core.messages import KeyPoolReport
from nproxyd.core.ports import BalanceProbe, KeyPoolStore, ProviderKeyRef
from nproxyd.core.records import KeyRow

_MAX_PROBES_PER_TICK = 1000


class KeyPoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``[actors.key_pool_recoverer]`` and ``[key_pool]``."""

    interval_seconds: float
    cooldown_minutes: float
    failures_before_manual_review: int
    balance_poll_seconds: float
    balance_probe_concurrency: int


class KeyPoolPorts(msgspec.Struct, frozen=True, kw_only=True):
    store: KeyPoolStore
    probe: BalanceProbe


class KeyPoolRecoverer:
    """Recovers cooled-down keys, then probes the balances that are due."""

    name = "key-pool-recoverer"

    def __init__(self, settings: KeyPoolSettings, ports: KeyPoolPorts, clock: Clock) -> None:
        self.settings = settings
        self.store = ports.store
        self.probe = ports.probe
        self.clock = clock
        self.interval_seconds = settings.interval_seconds
        self.log = structlog.get_logger().bind(actor=self.name)

    async def tick(self, now: datetime) -> KeyPoolReport:
        recovered = await self.store.recover(now)
        if recovered:
            self.log.info("provider_keys_recovered", recovered_count=len(recovered))
        keys = await self.store.claim_balance_due(
            now, self.settings.balance_poll_seconds, _MAX_PROBES_PER_TICK
        )
        balances, failures = await self._probe_all(keys)
        await self._record(balances, failures, now)
        if keys:
            self.log.info(
                "provider_key_balance_checked",
                checked_count=len(keys),
                failed_count=len(failures),
            )
        return KeyPoolReport(
            recovered_count=len(recovered),
            balance_checked_count=len(keys),
            balance_failed_count=len(failures),
        )

    async def _probe_all(self, keys: list[KeyRow]) -> tuple[dict[str, Decimal], dict[str, str]]:
        balances: dict[str, Decimal] = {}
        failures: dict[str, str] = {}
        limiter = anyio.CapacityLimiter(self.settings.balance_probe_concurrency)

        async def probe(key: KeyRow) -> None:
            async with limiter:
                ref = ProviderKeyRef(id=key.id, provider=key.provider, label=key.label)
                try:
                    balance = await self.probe.balance(ref)
                except BalanceProbeError as exc:
                    failures[key.id] = f"balance probe failed: {exc.message}"
                    return
            balances[key.id] = balance
            if balance <= 0:
                failures[key.id] = f"balance exhausted: {balance}"

        async with anyio.create_task_group() as group:
            for key in keys:
                group.start_soon(probe, key, name=f"balance-probe-{key.id}")
        return balances, failures

    async def _record(
        self, balances: dict[str, Decimal], failures: dict[str, str], now: datetime
    ) -> None:
        if balances:
            await self.store.record_balances(list(balances), list(balances.values()), now)
        if failures:
            transitions = await self.store.record_failures(
                list(failures),
                list(failures.values()),
                now,
                cooldown_minutes=self.settings.cooldown_minutes,
                failures_before_manual_review=self.settings.failures_before_manual_review,
            )
            for transition in transitions:
                self.log.warning(
                    "provider_key_failed", key_id=transition.id, status=transition.status
                )
