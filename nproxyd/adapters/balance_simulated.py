"""A simulated provider-key balance probe: configurable balances and errors."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from nproxyd.core.errors import BalanceProbeError
from nproxyd.core.ports import ProviderKeyRef


class SimulatedBalanceProbe:
    """Every key is healthy unless told otherwise, by key id."""

    def __init__(
        self,
        *,
        default_balance: Decimal = Decimal("100"),
        balances: Mapping[str, Decimal] | None = None,
        errors: Mapping[str, str] | None = None,
    ) -> None:
        self.default_balance = default_balance
        self.balances = dict(balances or {})
        self.errors = dict(errors or {})

    async def balance(self, key: ProviderKeyRef) -> Decimal:
        if key.id in self.errors:
            raise BalanceProbeError(self.errors[key.id])
        return self.balances.get(key.id, self.default_balance)
